"""Optimizers and schedules from explicit config fields.

`make_optimizer(cfg, params, total_steps)` returns (optax transformation, lr schedule).
Weight decay is a mask over parameter paths: biases and LayerNorm parameters are not decayed.
Layer-wise lr decay (`layer_decay` < 1, Clark et al. 2020) scales each update by
`layer_decay ** depth-from-top`: the head and pooler 1, the top layer `d`, ..., embeddings
`d ** (L + 1)`. Scaling the final update is scaling the learning rate, for every optimizer here.
`params` is the trainable part only (finetune.py), so frozen parameters get no state.
`adamw`, the default, is written out as one expression per parameter (`adamw` below) with the
clipping and lr scales inside it; the other optimizers are optax's, chained with them.

The fused `adamw` also takes a row-sparse gradient (`RowSparse`) for an embedding table that
the model only looks up (steps.train_step's `sparse_embed`): the rows a batch touched and their
ids, instead of a table-sized array that is zero but for them. The result is the dense
update's: every row still gets its moments' decay and weight decay, and the gradient's terms are
added to the moments of its rows alone; no table-sized gradient is written or read.

`ema` > 0 keeps an exponential moving average of the trained weights (Polyak averaging) in
the optimizer state, so it is checkpointed and resumed like the moments. Its decay ramps up as
min(ema, (1 + t) / (10 + t)) over the first updates (TF's ExponentialMovingAverage), so early
averages are not dominated by the initial weights. Evaluation, the best checkpoint, prediction
and export then use the average (`ema_params`); training continues from the raw weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from research import finetune

log = logging.getLogger(__name__)


@flax.struct.dataclass
class RowSparse:
  """The gradient of a V x H table that is zero outside a few rows: `rows[k]` is row `ids[k]`'s.
  `ids` are unique; unused slots hold V (out of range, so gathers fill 0 and scatters drop them)
  and zero rows. Made by `row_sparse`, taken by `adamw` and `tree_norm`."""

  ids: jax.Array  # K int32
  rows: jax.Array  # K x H


def row_sparse(ids: jax.Array, rows: jax.Array, num_rows: int) -> RowSparse:
  """The table gradient of a lookup `table[ids]` whose output got the gradient `rows`
  (ids: any shape, rows: ids.shape x H): duplicates summed, as the dense scatter-add would."""
  ids = ids.reshape(-1)
  rows = rows.reshape(ids.shape[0], -1)
  uniq, inverse = jnp.unique(ids, return_inverse=True, size=ids.shape[0], fill_value=num_rows)
  return RowSparse(uniq, jax.ops.segment_sum(rows, inverse.reshape(-1), num_segments=ids.shape[0]))


def _is_sparse(x) -> bool:
  return isinstance(x, RowSparse)


def tree_norm(grads) -> jax.Array:
  """optax.tree.norm (the global L2 norm), counting a RowSparse leaf by its rows."""
  leaves = jax.tree.leaves(grads, is_leaf=_is_sparse)
  return jnp.sqrt(optax.tree.norm([x.rows if _is_sparse(x) else x for x in leaves], squared=True))


class AdamWState(NamedTuple):
  count: jax.Array  # updates so far
  mu: Any  # first moment, a tree like the parameters
  nu: Any  # second moment


def adamw(
  lr: optax.Schedule,
  b1: float,
  b2: float,
  eps: float,
  weight_decay: float,
  mask,
  clip_norm: float = 0.0,
  lr_scales=None,
) -> optax.GradientTransformation:
  """AdamW (Loshchilov & Hutter), with global-norm clipping and per-parameter lr multipliers,
  computed as one elementwise expression per parameter: the same math as
  `chain(clip_by_global_norm(clip_norm), optax.adamw(lr, b1, b2, eps, weight_decay, mask=mask),
  scale_by_tree(lr_scales))` (tested against it), but XLA fuses it into three passes over each
  parameter (the two moments and the update) where the optax chain writes every stage to memory:
  a packed SST-2 step of MiniLM is ~5% faster on CPU (`benchmarks/train_step.py
  --optimizer-levers`). `mask` (a tree of bools) selects the parameters that decay.
  A gradient leaf may be a `RowSparse` (see the module docstring): its table is updated as if
  the gradient were dense, with the other rows' gradient zero."""

  def init(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
    return AdamWState(jnp.zeros((), jnp.int32), zeros(), zeros())

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("adamw needs the parameters in update() for weight decay")
    count = optax.safe_int32_increment(state.count)
    clip = jnp.minimum(1.0, clip_norm / tree_norm(grads)) if clip_norm else 1.0
    step_size = -lr(state.count)
    bc1, bc2 = 1.0 - b1**count, 1.0 - b2**count
    scales = lr_scales if lr_scales is not None else jax.tree.map(lambda _: 1.0, grads, is_leaf=_is_sparse)

    def leaf(g, m, v, p, decay, scale):
      if _is_sparse(g):  # the moments' decay on every row, the gradient's terms on its rows
        ids, g = g.ids, g.rows * clip
        m = (b1 * m).at[ids].add((1.0 - b1) * g, mode="drop", indices_are_sorted=True)
        v = (b2 * v).at[ids].add((1.0 - b2) * g * g, mode="drop", indices_are_sorted=True)
      else:
        g = g * clip
        m = b1 * m + (1.0 - b1) * g
        v = b2 * v + (1.0 - b2) * g * g
      u = (m / bc1.astype(m.dtype)) / (jnp.sqrt(v / bc2.astype(v.dtype)) + eps)
      if decay and weight_decay:
        u = u + weight_decay * p
      return (step_size * scale * u).astype(p.dtype), m, v

    out = jax.tree.map(leaf, grads, state.mu, state.nu, params, mask, scales, is_leaf=_is_sparse)
    parts = [jax.tree.map(lambda o, i=i: o[i], out, is_leaf=lambda x: isinstance(x, tuple)) for i in range(3)]
    return parts[0], AdamWState(count, parts[1], parts[2])

  return optax.GradientTransformation(init, update)


def _adamw(lr, c, mask, clip_norm=0.0, lr_scales=None):
  return adamw(lr, c.b1, c.b2, c.eps, c.weight_decay, mask, clip_norm, lr_scales)


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
  if c.lr < 0:
    raise ValueError(f"config.optimizer.lr={c.lr}: must be >= 0")
  if c.warmup_steps < 0 or not 0.0 <= c.warmup_ratio < 1.0:
    raise ValueError(
      f"config.optimizer.warmup_steps={c.warmup_steps}, warmup_ratio={c.warmup_ratio}: "
      "expected warmup_steps >= 0 and 0 <= warmup_ratio < 1"
    )
  if not 0.0 <= c.end_lr_ratio <= 1.0:
    raise ValueError(f"config.optimizer.end_lr_ratio={c.end_lr_ratio}: expected 0 <= end_lr_ratio <= 1")
  warmup = c.warmup_steps or int(round(c.warmup_ratio * total_steps))
  if warmup >= total_steps:
    log.warning(
      "config.optimizer.warmup_steps=%d is not shorter than the run's %d steps: the learning rate never reaches "
      "config.optimizer.lr=%g",
      warmup,
      total_steps,
      c.lr,
    )
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
    # step counts from the end of warmup; join_schedules also evaluates it (unused) during
    # warmup, where step < 0, so clamp it there.
    after = lambda step: c.lr * jnp.sqrt(w / (jnp.maximum(step, 0) + w))  # noqa: E731
  else:
    raise ValueError(f"config.optimizer.schedule={c.schedule!r}: expected constant, linear, cosine or inverse_sqrt")
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, c.lr, warmup), after], [warmup])


def decay_mask(params) -> dict:
  """True where weight decay applies: matrices and embeddings, not biases or norms."""
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict(
    {
      path: not (path[-1].endswith("bias") or path[-1] == "scale" or any("norm" in p for p in path[:-1]))
      for path in flat
    }
  )


def layer_lr_scales(params, decay: float, layers: int) -> dict:
  """A tree like `params` of lr multipliers: decay ** (L + 1 - depth); embeddings are depth 0."""
  flat = flax.traverse_util.flatten_dict(params)

  def depth(path) -> int:
    i = finetune._layer_index(path)
    if i is not None:
      return i + 1
    return 0 if any(p.endswith("embed") or p == "embed_norm" for p in path) else layers + 1

  return flax.traverse_util.unflatten_dict({p: decay ** (layers + 1 - depth(p)) for p in flat})


def scale_by_tree(scales) -> optax.GradientTransformation:
  """Multiply each update by a fixed per-parameter constant."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * s, updates, scales), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class EmaState(NamedTuple):
  inner: Any  # the wrapped optimizer's state
  count: jax.Array  # updates averaged so far
  ema: Any  # the moving average, a tree like the trainable parameters


def with_ema(tx: optax.GradientTransformation, decay: float) -> optax.GradientTransformation:
  """`tx`, plus an average of the parameters after each of its updates (in fp32)."""

  def init(params):
    # A copy even where the parameters are fp32 already: a state whose average shares the
    # parameters' buffers cannot be donated to the step.
    ema = jax.tree.map(lambda p: jnp.array(p, jnp.float32, copy=True), params)
    return EmaState(tx.init(params), jnp.zeros((), jnp.int32), ema)

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("with_ema needs the parameters in update()")
    updates, inner = tx.update(updates, state.inner, params)
    new = optax.apply_updates(params, updates)
    d = jnp.minimum(decay, (1.0 + state.count) / (10.0 + state.count))
    ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p.astype(jnp.float32), state.ema, new)
    return updates, EmaState(inner, state.count + 1, ema)

  return optax.GradientTransformation(init, update)


def ema_params(params, opt_state):
  """The weights to evaluate and export: `params` with the trained leaves replaced by their
  moving average when the optimizer keeps one, else `params`. Works on a live state and on a
  checkpoint restored without a target (where the EmaState is a dict)."""
  if isinstance(opt_state, EmaState):
    ema = opt_state.ema
  elif isinstance(opt_state, dict) and "ema" in opt_state and "inner" in opt_state:
    ema = opt_state["ema"]
  else:
    return params
  flat = flax.traverse_util.flatten_dict(params)
  avg = flax.traverse_util.flatten_dict(ema)
  return flax.traverse_util.unflatten_dict({k: avg[k].astype(v.dtype) if k in avg else v for k, v in flat.items()})


def make_optimizer(
  c: ml_collections.ConfigDict, params, total_steps: int, layers: int | None = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  if c.name not in OPTIMIZERS:
    raise KeyError(f"config.optimizer.name={c.name!r}: expected one of {', '.join(OPTIMIZERS)}")
  schedule = make_schedule(c, total_steps)
  if c.clip_norm < 0:
    raise ValueError(f"config.optimizer.clip_norm={c.clip_norm}: must be >= 0 (0 = no clipping)")
  decay = c.get("layer_decay", 1.0)
  if not 0.0 < decay <= 1.0:
    raise ValueError(f"config.optimizer.layer_decay={decay}: expected 0 < decay <= 1")
  layers = finetune.num_layers(params) if layers is None else layers
  scales = layer_lr_scales(params, decay, layers) if decay != 1.0 else None
  if c.name == "adamw":  # fused: clipping and the lr scales are part of its one expression
    tx = _adamw(schedule, c, decay_mask(params), c.clip_norm, scales)
  else:
    tx = OPTIMIZERS[c.name](schedule, c, decay_mask(params))
    if c.clip_norm:
      tx = optax.chain(optax.clip_by_global_norm(c.clip_norm), tx)
    if scales is not None:
      tx = optax.chain(tx, scale_by_tree(scales))
  if c.get("sam_rho", 0.0) < 0:  # applied in steps.train_step, which needs the gradient function
    raise ValueError(f"config.optimizer.sam_rho={c.sam_rho}: expected >= 0 (0 = off)")
  ema = c.get("ema", 0.0)
  if ema:
    if not 0.0 < ema < 1.0:
      raise ValueError(f"config.optimizer.ema={ema}: expected 0 < ema < 1 (0 = off)")
    tx = with_ema(tx, ema)
  return tx, schedule
