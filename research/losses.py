"""Losses: keyword-only, returning (sum, count), never a mean.

The trainer divides the sum by the count after summing over devices and accumulation
steps, so a batch with padded rows (weight 0) or an uneven last batch is averaged exactly.
Swap one with `config.loss = "label_smoothing"`; extra hyperparameters come from
`config.loss_kwargs`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

LossFn = Callable[..., tuple[jax.Array, jax.Array]]


def softmax_xent(*, logits, labels, weights, **_) -> tuple[jax.Array, jax.Array]:
  """Cross-entropy of integer labels; logits BxC, labels B, weights B."""
  per_ex = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return (per_ex * weights).sum(), weights.sum()


def label_smoothing(*, logits, labels, weights, smoothing: float = 0.1, **_):
  num_classes = logits.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
  per_ex = optax.softmax_cross_entropy(logits, targets)
  return (per_ex * weights).sum(), weights.sum()


def class_weighted_xent(*, logits, labels, weights, class_weights: tuple[float, ...] = (), **_):
  """Cross-entropy with a weight per class; the count is the weighted count, as in torch."""
  cw = jnp.asarray(class_weights or (1.0,) * logits.shape[-1], jnp.float32)
  w = weights * cw[labels]
  per_ex = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return (per_ex * w).sum(), w.sum()


def focal(*, logits, labels, weights, gamma: float = 2.0, **_):
  """Focal loss (Lin et al. 2017): -(1 - p_t)^gamma log p_t."""
  logp_t = jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
  per_ex = -((1.0 - jnp.exp(logp_t)) ** gamma) * logp_t
  return (per_ex * weights).sum(), weights.sum()


def mse(*, logits, labels, weights, **_):
  """Regression: logits Bx1 against float labels B."""
  per_ex = (logits[:, 0] - labels) ** 2
  return (per_ex * weights).sum(), weights.sum()


def huber(*, logits, labels, weights, delta: float = 1.0, **_):
  per_ex = optax.huber_loss(logits[:, 0], labels, delta=delta)
  return (per_ex * weights).sum(), weights.sum()


def distill(*, logits, labels, weights, teacher_logits=None, temperature: float = 2.0, alpha: float = 0.5, **_):
  """Knowledge distillation (Hinton et al. 2015), per example:

      alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(labels)

  T^2 keeps the soft term's gradient scale independent of T. `teacher_logits` (BxC) come in
  the batch (train.py scores the train set with the teacher once, before training). Without
  them (dev batches) the loss is the hard-label cross-entropy, so dev losses stay comparable.
  """
  hard = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  if teacher_logits is None:
    return (hard * weights).sum(), weights.sum()
  t = temperature
  p_teacher = jax.nn.softmax(teacher_logits / t)
  kl = (p_teacher * (jax.nn.log_softmax(teacher_logits / t) - jax.nn.log_softmax(logits / t))).sum(-1)
  per_ex = alpha * t**2 * kl + (1.0 - alpha) * hard
  return (per_ex * weights).sum(), weights.sum()


def rdrop_consistency(logits_a, logits_b, weights) -> jax.Array:
  """R-Drop's regularizer (Liang et al. 2021), summed over examples (weighted): the symmetric
  KL between the predictions of two dropout passes over the same example,
  KL(p_a || p_b) + KL(p_b || p_a) = sum_c (p_a - p_b)(log p_a - log p_b); for regression (one
  output) the squared difference of the two outputs."""
  if logits_a.shape[-1] == 1:
    per_ex = jnp.square(logits_a[:, 0] - logits_b[:, 0])
  else:
    log_a, log_b = jax.nn.log_softmax(logits_a), jax.nn.log_softmax(logits_b)
    per_ex = ((jnp.exp(log_a) - jnp.exp(log_b)) * (log_a - log_b)).sum(-1)
  return (per_ex * weights).sum()


LOSSES: dict[str, LossFn] = {
  "softmax_xent": softmax_xent,
  "label_smoothing": label_smoothing,
  "class_weighted_xent": class_weighted_xent,
  "focal": focal,
  "mse": mse,
  "huber": huber,
  "distill": distill,
}


# The head each built-in loss expects, checked against the task before a run starts (a loss
# registered without an entry here is not checked).
KINDS = {
  name: "classification" for name in ("softmax_xent", "label_smoothing", "class_weighted_xent", "focal", "distill")
}
KINDS |= {"mse": "regression", "huber": "regression"}


def get_loss(name: str) -> LossFn:
  if name not in LOSSES:
    raise KeyError(f"config.loss={name!r} is not a registered loss: {', '.join(LOSSES)}")
  return LOSSES[name]
