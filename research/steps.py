"""train_step / eval_step: pure functions of (state, batch), no I/O.

They are bound with functools.partial and jitted once by `parallel.py`. Metrics come back
as sums and counts; the host divides after summing over steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from research.losses import LossFn

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # raw key data; each step folds in its own step number


def create_state(params, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)


def _forward(params, batch, rng, *, model: nn.Module, train: bool):
  return model.apply(
    {"params": params}, *(batch[k] for k in MODEL_INPUTS), train=train, rngs={"dropout": rng} if train else None
  )


def _correct(logits_BxC, labels_B, weights_B) -> jax.Array:
  if logits_BxC.shape[-1] == 1:  # regression: no accuracy
    return jnp.zeros((), jnp.float32)
  return ((logits_BxC.argmax(-1) == labels_B) * weights_B).sum()


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  model: nn.Module,
  loss_fn: LossFn,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  grad_accum: int = 1,
  loss_kwargs: dict | None = None,
  reduce: Callable = lambda tree: tree,
  rng_impl: str = "threefry2x32",
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a (global) batch, optionally in `grad_accum` micro-batches.

  The gradient is d(sum of losses)/d(params) divided by the total count, so it is the
  exact mean over the batch however it is split across devices and micro-batches.
  `reduce` sums over devices where the step sees only its shard (`pmap`: a psum);
  under `jit` the batch is global and it is the identity. A
  non-finite loss or gradient leaves the state unchanged and reports `nonfinite = 1`,
  so the host can stop before anything bad is saved.
  """
  loss_kwargs = loss_kwargs or {}
  key = jax.random.wrap_key_data(state.rng, impl=rng_impl)
  rng = jax.random.fold_in(key, state.step)  # resume-exact dropout

  def loss_and_aux(params, micro, micro_rng):
    logits = _forward(params, micro, micro_rng, model=model, train=True)
    loss_sum, count = loss_fn(logits=logits, labels=micro["labels"], weights=micro["weights"], **loss_kwargs)
    return loss_sum, (count, _correct(logits, micro["labels"], micro["weights"]))

  grad_fn = jax.value_and_grad(loss_and_aux, has_aux=True)
  if grad_accum == 1:
    (loss_sum, (count, correct)), grads = grad_fn(state.params, batch, rng)
  else:
    # Row i*M + m goes to micro-batch m: each device keeps its own rows, no resharding.
    def split(x):
      return x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)

    micro_batches = jax.tree.map(split, batch)

    def accumulate(carry, xs):
      micro, i = xs
      (loss, (c, k)), g = grad_fn(state.params, micro, jax.random.fold_in(rng, i))
      acc_g, acc_l, acc_c, acc_k = carry
      return (jax.tree.map(jnp.add, acc_g, g), acc_l + loss, acc_c + c, acc_k + k), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    init = (zeros, jnp.zeros(()), jnp.zeros(()), jnp.zeros(()))
    (grads, loss_sum, count, correct), _ = jax.lax.scan(accumulate, init, (micro_batches, jnp.arange(grad_accum)))

  grads, loss_sum, count, correct = reduce((grads, loss_sum, count, correct))
  grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
  new_state = state.replace(
    step=state.step + 1, params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state)
  )
  metrics = {
    "loss_sum": loss_sum,
    "count": count,
    "correct": correct,
    "grad_norm": grad_norm,
    "param_norm": optax.tree.norm(params),
    "update_norm": optax.tree.norm(updates),
    "lr": schedule(state.step),
    "nonfinite": (~finite).astype(jnp.float32),
  }
  return new_state, metrics


def eval_step(
  params,
  batch: dict[str, jax.Array],
  *,
  model: nn.Module,
  loss_fn: LossFn,
  loss_kwargs: dict | None = None,
  reduce: Callable = lambda tree: tree,
) -> dict[str, jax.Array]:
  """Loss sums plus the logits of every row; padded rows (weight 0) are dropped on the host."""
  logits = _forward(params, batch, None, model=model, train=False)
  loss_sum, count = loss_fn(logits=logits, labels=batch["labels"], weights=batch["weights"], **(loss_kwargs or {}))
  loss_sum, count = reduce((loss_sum, count))
  return {"loss_sum": loss_sum, "count": count, "logits": logits}
