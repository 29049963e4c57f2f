"""Optimizers and schedules from explicit config fields.

`make_optimizer(cfg, params, total_steps)` returns (optax transformation, lr schedule).
Weight decay is a mask over parameter paths: biases and LayerNorm parameters are not decayed.
"""

from __future__ import annotations

from collections.abc import Callable

import flax
import ml_collections
import optax


def _adamw(lr, c, mask):
  return optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=mask)


def _with_decay(opt: optax.GradientTransformation, c, mask) -> optax.GradientTransformation:
  """Decoupled weight decay for optimizers that have no argument for it."""
  if not c.weight_decay:
    return opt
  return optax.chain(optax.add_decayed_weights(c.weight_decay, mask), opt)


OPTIMIZERS: dict[str, Callable] = {
  "adamw": _adamw,
  "adam": lambda lr, c, mask: optax.adam(lr, b1=c.b1, b2=c.b2, eps=c.eps),
  "sgd": lambda lr, c, mask: _with_decay(optax.sgd(lr), c, mask),
  "momentum": lambda lr, c, mask: _with_decay(optax.sgd(lr, momentum=c.momentum), c, mask),
  "nesterov": lambda lr, c, mask: _with_decay(optax.sgd(lr, momentum=c.momentum, nesterov=True), c, mask),
  "lamb": lambda lr, c, mask: optax.lamb(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=mask),
  "lion": lambda lr, c, mask: optax.lion(lr, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay, mask=mask),
  "adafactor": lambda lr, c, mask: optax.adafactor(
    lr, weight_decay_rate=c.weight_decay or None, weight_decay_mask=mask
  ),
  "rmsprop": lambda lr, c, mask: _with_decay(optax.rmsprop(lr, eps=c.eps), c, mask),
}


def make_schedule(c: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """constant | linear | cosine | inverse_sqrt, each after a linear warmup."""
  warmup = c.warmup_steps or int(round(c.warmup_ratio * total_steps))
  decay_steps = max(total_steps - warmup, 1)
  end = c.lr * c.end_lr_ratio
  if c.schedule == "constant":
    after = optax.constant_schedule(c.lr)
  elif c.schedule == "linear":
    after = optax.linear_schedule(c.lr, end, decay_steps)
  elif c.schedule == "cosine":
    after = optax.cosine_decay_schedule(c.lr, decay_steps, alpha=c.end_lr_ratio)
  elif c.schedule == "inverse_sqrt":
    w = max(warmup, 1)
    after = lambda step: c.lr * (w / (step + w)) ** 0.5  # noqa: E731  (step counts from the end of warmup)
  else:
    raise ValueError(f"config.optimizer.schedule={c.schedule!r}: expected constant, linear, cosine or inverse_sqrt")
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, c.lr, warmup), after], [warmup])


def decay_mask(params) -> dict:
  """True where weight decay applies: matrices and embeddings, not biases or norms."""
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict(
    {path: not (path[-1] == "bias" or path[-1] == "scale" or "norm" in path[-2]) for path in flat}
  )


def make_optimizer(
  c: ml_collections.ConfigDict, params, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  if c.name not in OPTIMIZERS:
    raise KeyError(f"config.optimizer.name={c.name!r}: expected one of {', '.join(OPTIMIZERS)}")
  schedule = make_schedule(c, total_steps)
  tx = OPTIMIZERS[c.name](schedule, c, decay_mask(params))
  if c.clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(c.clip_norm), tx)
  return tx, schedule
