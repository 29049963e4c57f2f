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

from research import finetune, optim
from research.losses import LossFn, rdrop_consistency

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "masked_positions")
# Batch fields that are neither model inputs nor labels/weights go to the loss as keywords
# (e.g. `teacher_logits` for distillation).
_ROW_FIELDS = (*MODEL_INPUTS, "positions")  # per token; the rest are per example
_NOT_LOSS_INPUTS = (*_ROW_FIELDS, "labels", "weights")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any  # over the trainable parameters only (see finetune.py)
  rng: jax.Array  # raw key data; each step folds in its own step number


def create_state(params, tx: optax.GradientTransformation, rng: jax.Array, mask=None) -> TrainState:
  """`mask` (a tree of bools, finetune.trainable_mask) selects what trains; None = everything."""
  trainable = params if mask is None else finetune.partition(params, mask)[0]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(trainable), rng=rng)


def _forward(params, batch, rng, *, model: nn.Module, train: bool, perturbations=None):
  inputs = [batch[k] for k in MODEL_INPUTS if k in batch]  # a decoder LM takes input_ids only
  if "positions" in batch:  # packed rows (pipeline.pack_plan): R rows x S example slots
    inputs += [batch["positions"], batch["labels"].shape[1]]
  variables = {"params": params} | ({"perturbations": perturbations} if perturbations is not None else {})
  return model.apply(variables, *inputs, train=train, rngs={"dropout": rng} if train else None)


def _per_example(batch):
  """Packed rows carry labels, weights and extras as RxS[x...]; the logits come (R*S)xC."""
  if "positions" not in batch:
    return batch
  return {k: v if k in _ROW_FIELDS else v.reshape(-1, *v.shape[2:]) for k, v in batch.items()}


def _loss_extras(batch) -> dict:
  return {k: v for k, v in batch.items() if k not in _NOT_LOSS_INPUTS}


def _correct(logits_BxC, labels_B, weights_B) -> jax.Array:
  """Weighted count of rows whose label's logit is the largest. Not `argmax == label`: XLA:CPU
  runs argmax as a variadic (value, index) reduction, 87 ms of a 2.4 s masked-LM step over a
  30k vocabulary, while this max is the one the cross-entropy computes anyway. The two differ
  only on exact ties, where argmax picks the first class and this counts any tied class."""
  if logits_BxC.shape[-1] == 1:  # regression: no accuracy
    return jnp.zeros((), jnp.float32)
  label_logit_B = jnp.take_along_axis(logits_BxC, labels_B[..., None], axis=-1)[..., 0]
  return ((label_logit_B >= logits_BxC.max(-1)) * weights_B).sum()


def _nest(path: tuple, value) -> dict:
  return flax.traverse_util.unflatten_dict({tuple(path): value})


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
  mask=None,
  norms: bool = True,
  rdrop_alpha: float = 0.0,
  sam_rho: float = 0.0,
  sparse_embed: bool = False,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a (global) batch, optionally in `grad_accum` micro-batches.

  The gradient is d(sum of losses)/d(params) divided by the total count, so it is the
  exact mean over the batch however it is split across devices and micro-batches.
  `reduce` sums over devices where the step sees only its shard (`pmap`: a psum);
  under `jit` the batch is global and it is the identity. A non-finite loss or gradient
  reports `nonfinite = 1`; the host checks every step's flag before it saves or evaluates, so
  a poisoned state is never kept (the step itself does not select between old and new state:
  that pass over parameters and optimizer state cost ~17% of a short-sequence MiniLM step).
  `norms=False` leaves the parameter and update norms out (NaN): reading the new parameters and
  the updates again makes XLA copy every parameter and keep the updates in memory, ~10% of a
  packed SST-2 step (`benchmarks/train_step.py --optimizer-levers`). The trainer compiles only
  this variant and measures the norms on its logging steps from outside (`update_norms`). Only
  the parameters `mask` marks trainable are differentiated and updated; the rest are constants
  of the step.

  `rdrop_alpha > 0` (R-Drop, Liang et al. 2021; classifiers): every row goes through the model
  twice in one forward pass, under different dropout masks, and each example's loss is half the
  paper's, (loss_a + loss_b) / 2 + alpha / 4 * symmetric KL(p_a, p_b), so alpha is the paper's.
  The copies sit next to each other (rows 2r, 2r + 1), on the device that holds row r.

  `sam_rho > 0` (SAM, Foret et al. 2021): the update uses the gradient at the weights moved
  rho along the normalized gradient, w + rho * g / |g| (the worst point within rho, to first
  order), computed on the same batch with the same dropout masks: two forward and backward
  passes per step. The loss and accuracy are those at w; `grad_norm` is the gradient applied.

  `sparse_embed` (where the model names a `row_sparse_table` that trains, and without SAM): that
  embedding table's gradient is taken at the lookup's output (a Flax perturbation named by the
  model's `row_sparse_rows`) and handed to `tx` as an `optim.RowSparse`, the rows the batch
  touched, instead of a zero-filled V x H array with those rows added in. `tx` must take it (the
  fused `optim.adamw` does, with the dense update's result) and the batch must be global (`jit`;
  under `pmap` the rows would not be summed over devices, so `parallel.Strategy` passes False).
  """
  loss_kwargs = loss_kwargs or {}
  key = jax.random.wrap_key_data(state.rng, impl=rng_impl)
  rng = jax.random.fold_in(key, state.step)  # resume-exact dropout
  if mask is None:
    trainable, frozen = state.params, {}
  else:
    trainable, frozen = finetune.partition(state.params, mask)
  differentiated, flat = trainable, flax.traverse_util.flatten_dict(trainable)
  table_path = getattr(model, "row_sparse_table", None) if sparse_embed and not sam_rho else None
  if table_path in flat:  # the table becomes a constant of the loss below
    table = flat.pop(table_path)
    differentiated = flax.traverse_util.unflatten_dict(flat)
  else:
    table_path = None

  def loss_and_aux(train_params, micro, micro_rng, token_rows=None):
    params = train_params if mask is None else finetune.combine(train_params, frozen)
    perturbations = None
    if table_path:  # a constant here: the gradient is taken at its lookup's output instead
      params = finetune.combine(_nest(table_path, table), params)
      perturbations = _nest(model.row_sparse_rows, token_rows)
    if not rdrop_alpha:
      logits = _forward(params, micro, micro_rng, model=model, train=True, perturbations=perturbations)
    else:
      twice = jax.tree.map(lambda x: jnp.repeat(x, 2, axis=0), micro)
      both = _forward(params, twice, micro_rng, model=model, train=True, perturbations=perturbations)
      rows = micro["input_ids"].shape[0]  # packed: logits are (2R * S) x C, slots row-major
      both = both.reshape(rows, 2, -1, both.shape[-1])
      logits, logits_b = both[:, 0].reshape(-1, both.shape[-1]), both[:, 1].reshape(-1, both.shape[-1])
    micro = _per_example(micro)
    labels, weights, extras = micro["labels"], micro["weights"], _loss_extras(micro)
    loss_sum, count = loss_fn(logits=logits, labels=labels, weights=weights, **extras, **loss_kwargs)
    if rdrop_alpha:
      loss_b, _ = loss_fn(logits=logits_b, labels=labels, weights=weights, **extras, **loss_kwargs)
      consistency = rdrop_consistency(logits, logits_b, weights)
      loss_sum = 0.5 * (loss_sum + loss_b) + 0.25 * rdrop_alpha * consistency
    return loss_sum, (count, _correct(logits, labels, weights))

  grad_fn = jax.value_and_grad(loss_and_aux, argnums=(0, 3) if table_path else 0, has_aux=True)

  def micro_gradients(train_params, micro, micro_rng):
    """((loss, aux), dense grads), and for the table (ids, gradient at their lookups) or None."""
    if not table_path:
      return grad_fn(train_params, micro, micro_rng), None
    ids = jnp.repeat(micro["input_ids"], 2, axis=0) if rdrop_alpha else micro["input_ids"]
    out, (grads, rows) = grad_fn(train_params, micro, micro_rng, jnp.zeros((*ids.shape, table.shape[1]), table.dtype))
    return (out, grads), (ids, rows)

  def gradients(train_params):
    """The batch-mean gradient at `train_params`, with the loss sum, count and correct count."""
    if grad_accum == 1:
      ((loss_sum, (count, correct)), grads), looked_up = micro_gradients(train_params, batch, rng)
    else:
      # Row i*M + m goes to micro-batch m: each device keeps its own rows, no resharding.
      def split(x):
        return x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)

      def accumulate(carry, xs):
        micro, i = xs
        ((loss, (c, k)), g), looked_up = micro_gradients(train_params, micro, jax.random.fold_in(rng, i))
        acc_g, acc_l, acc_c, acc_k = carry
        return (jax.tree.map(jnp.add, acc_g, g), acc_l + loss, acc_c + c, acc_k + k), looked_up

      zeros = jax.tree.map(jnp.zeros_like, train_params)
      init = (zeros, jnp.zeros(()), jnp.zeros(()), jnp.zeros(()))
      xs = (jax.tree.map(split, batch), jnp.arange(grad_accum))
      (grads, loss_sum, count, correct), looked_up = jax.lax.scan(accumulate, init, xs)
    grads, loss_sum, count, correct = reduce((grads, loss_sum, count, correct))
    grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)
    if table_path:
      ids, rows = looked_up
      sparse = optim.row_sparse(ids, rows / jnp.maximum(count, 1.0), table.shape[0])
      grads = finetune.combine(_nest(table_path, sparse), grads)
    return grads, loss_sum, count, correct

  grads, loss_sum, count, correct = gradients(differentiated)
  if sam_rho:
    scale = sam_rho / jnp.maximum(optax.tree.norm(grads), 1e-12)
    grads = gradients(jax.tree.map(lambda w, g: w + scale * g, trainable, grads))[0]
  updates, opt_state = tx.update(grads, state.opt_state, trainable)
  params = optax.apply_updates(trainable, updates)
  if mask is not None:
    params = finetune.combine(params, frozen)

  grad_norm = optim.tree_norm(grads)
  finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)
  if norms:
    param_norm, update_norm = optax.tree.norm(params), optax.tree.norm(updates)
  else:
    param_norm = update_norm = jnp.full((), jnp.nan)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  metrics = {
    "loss_sum": loss_sum,
    "count": count,
    "correct": correct,
    "grad_norm": grad_norm,
    "param_norm": param_norm,
    "update_norm": update_norm,
    "lr": schedule(state.step),
    "nonfinite": (~finite).astype(jnp.float32),
  }
  return new_state, metrics


def copy_params(params):
  """A copy of the parameters (new buffers), for `update_norms` across a step that donates them."""
  return jax.tree.map(jnp.copy, params)


def update_norms(before, after) -> dict[str, jax.Array]:
  """`param_norm` and `update_norm` of a step, measured from outside it: the norm of the
  parameters after the step and of what it added to them (after - before; zero where frozen).
  The trainer runs its step with `norms=False` (one compiled program per batch shape) and calls
  this on its logging steps with a copy of the parameters taken before the step, which donates
  them: a copy and a read of the parameters on those steps only."""
  return {
    "param_norm": optax.tree.norm(after),
    "update_norm": optax.tree.norm(jax.tree.map(jnp.subtract, after, before)),
  }


def eval_step(
  params,
  batch: dict[str, jax.Array],
  *,
  model: nn.Module,
  loss_fn: LossFn,
  loss_kwargs: dict | None = None,
  reduce: Callable = lambda tree: tree,
  return_logits: bool = True,
) -> dict[str, jax.Array]:
  """Loss sums (and correct counts) plus, for classification, the logits of every row;
  padded rows (weight 0) are dropped on the host. Language models set `return_logits=False`."""
  logits = _forward(params, batch, None, model=model, train=False)
  batch = _per_example(batch)
  loss_sum, count = loss_fn(
    logits=logits, labels=batch["labels"], weights=batch["weights"], **_loss_extras(batch), **(loss_kwargs or {})
  )
  correct = _correct(logits, batch["labels"], batch["weights"])
  loss_sum, count, correct = reduce((loss_sum, count, correct))
  out = {"loss_sum": loss_sum, "count": count, "correct": correct}
  return out | {"logits": logits} if return_logits else out
