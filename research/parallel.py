"""Device mesh, shardings, and how a step is compiled. All strategy differences live here.

The main path (`config.parallel = "jit"`): one `Mesh` with a `data` axis; batches are
sharded on `P("data")`, the state is replicated, and `jax.jit` inserts the gradient
all-reduce. With `config.fsdp = k > 1` the mesh is `data x fsdp` (k devices per fsdp group):
batches are sharded over both axes and every large parameter and optimizer-state array is
sharded over `fsdp` along its largest divisible dimension (ZeRO-3 style, `state_shardings`);
XLA all-gathers weights for the matmuls and reduce-scatters the gradients. `"pmap"` runs the
same step under `jax.pmap`, each device on its shard, with an explicit psum of gradient and loss sums. On several hosts each process feeds its own rows and
`jax.make_array_from_process_local_data` builds the global batch.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from research import compile_cache

log = logging.getLogger(__name__)


def maybe_initialize_distributed(enabled: bool) -> None:
  """Join a multi-process run (coordinator from the environment, as on TPU pods / Slurm)."""
  if enabled:
    jax.distributed.initialize()
    log.info("process %d/%d, %d local devices", jax.process_index(), jax.process_count(), jax.local_device_count())


def make_mesh(num_devices: int = 0, fsdp: int = 1) -> Mesh:
  devices = jax.devices()
  n = num_devices or len(devices)
  if n > len(devices):
    raise ValueError(f"config.num_devices={n} but only {len(devices)} devices are visible")
  if fsdp <= 1:
    return jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,), devices=devices[:n])
  if n % fsdp:
    raise ValueError(f"config.fsdp={fsdp} must divide the number of devices ({n})")
  return jax.make_mesh((n // fsdp, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2, devices=devices[:n])


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows split over every device: P("data"), or P(("data", "fsdp")) with an fsdp axis."""
  return NamedSharding(mesh, P(tuple(mesh.axis_names) if len(mesh.axis_names) > 1 else "data"))


# Arrays smaller than this stay replicated under fsdp: sharding them saves little and costs a collective.
FSDP_MIN_SIZE = 2**14


def fsdp_sharding(x, mesh: Mesh) -> NamedSharding:
  """Shard `x` over `fsdp` along its largest dimension the group size divides, else replicate."""
  k = dict(mesh.shape).get("fsdp", 1)
  shape = getattr(x, "shape", ())
  if k == 1 or len(shape) == 0 or np.prod(shape) < FSDP_MIN_SIZE:
    return replicated(mesh)
  dims = [d for d in range(len(shape)) if shape[d] % k == 0]
  if not dims:
    return replicated(mesh)
  d = max(dims, key=lambda i: shape[i])
  return NamedSharding(mesh, P(*[("fsdp" if i == d else None) for i in range(len(shape))]))


def state_shardings(tree, mesh: Mesh):
  """The sharding of every leaf of a train state (or params): replicated, or fsdp rules."""
  return jax.tree.map(lambda x: fsdp_sharding(x, mesh), tree)


def place_state(state, mesh: Mesh):
  """A state in the jit layout: replicated, or fsdp-sharded (what checkpoints hold)."""
  return jax.device_put(state, state_shardings(state, mesh))


def init_sharded(fn: Callable, *args, mesh: Mesh, donate_argnums: tuple[int, ...] = ()):
  """`fn(*args)` computed straight into the jit layout (`state_shardings` of its result).

  Each device computes only its own shards, so under fsdp no device ever holds a whole
  parameter tree or optimizer state, as `place_state(fn(*args))` would on the way."""
  shardings = state_shardings(jax.eval_shape(fn, *args), mesh)
  return jax.jit(fn, out_shardings=shardings, donate_argnums=donate_argnums)(*args)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, grad_accum: int = 1, name: str = "batch_size") -> None:
  n = mesh.size
  if batch_size % (n * grad_accum):
    raise ValueError(f"config.{name}={batch_size} must be divisible by devices ({n}) x grad_accum ({grad_accum})")


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows -> global arrays sharded on `data`."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def replicate(tree, mesh: Mesh):
  return jax.device_put(tree, replicated(mesh))


def compile_train_step(step_fn: Callable, mesh: Mesh, donate: bool = True, state_sharding=None) -> Callable:
  """jit with the state replicated (or as `state_sharding` says) and donated, the batch sharded."""
  state_sharding = replicated(mesh) if state_sharding is None else state_sharding
  return jax.jit(
    step_fn,
    in_shardings=(state_sharding, batch_sharding(mesh)),
    out_shardings=(state_sharding, replicated(mesh)),
    donate_argnums=(0,) if donate else (),
  )


def compile_eval_step(step_fn: Callable, mesh: Mesh, state_sharding=None) -> Callable:
  state_sharding = replicated(mesh) if state_sharding is None else state_sharding
  return jax.jit(step_fn, in_shardings=(state_sharding, batch_sharding(mesh)))


class Strategy:
  """Where state and batches live, and how the steps are compiled: "jit" or "pmap".

  The trainer sees one interface. Checkpoints always hold the jit layout (replicated
  global arrays), so a run saved under one strategy restores under the other.
  """

  def __init__(self, kind: str, mesh: Mesh):
    if kind not in ("jit", "pmap"):
      raise ValueError(f"config.parallel={kind!r}: expected 'jit' or 'pmap'")
    if kind == "pmap" and "fsdp" in mesh.axis_names:
      raise ValueError("config.fsdp > 1 needs config.parallel='jit' (pmap replicates the state on every device)")
    self.kind, self.mesh = kind, mesh
    self.n = mesh.shape["data"]

  def put_state(self, state):
    """A state (any layout) -> the layout the compiled step takes."""
    if self.kind == "jit":
      return place_state(state, self.mesh)
    state = replicate(state, self.mesh)
    stacked = jax.tree.map(lambda x: jax.numpy.broadcast_to(x, (self.n, *x.shape)), state)
    return jax.device_put(stacked, batch_sharding(self.mesh))

  def get_state(self, state):
    """The compiled step's layout -> the jit layout (what checkpoints hold: global arrays,
    replicated or fsdp-sharded; Orbax restores them into any other layout)."""
    if self.kind == "jit":
      return state
    return replicate(jax.tree.map(lambda x: x[0], state), self.mesh)

  def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    if self.kind == "jit":
      return to_global(batch, self.mesh)
    local_n = self.n // jax.process_count()
    sharding = batch_sharding(self.mesh)
    return {
      k: jax.make_array_from_process_local_data(sharding, v.reshape(local_n, v.shape[0] // local_n, *v.shape[1:]))
      for k, v in batch.items()
    }

  def rows(self, x: jax.Array) -> np.ndarray:
    """A batch-shaped output as numpy rows in global batch order, on every host."""
    x = gather(x)
    return x if self.kind == "jit" else x.reshape(-1, *x.shape[2:])

  def scalars(self, metrics: dict) -> dict:
    """Step metrics on the host (pmap returns one identical copy per device)."""
    metrics = jax.device_get(metrics)
    return metrics if self.kind == "jit" else jax.tree.map(lambda x: x[0], metrics)

  def compile_train(self, step_fn: Callable, donate: bool = True, key=None) -> Callable:
    """`step_fn(state, batch, *, reduce, sparse_embed)` -> compiled `(state, batch) -> (state, metrics)`.
    Under pmap each device sees its own rows, so the row-sparse embedding gradient (which takes
    the batch's token ids as global) is turned off there. With a `key` (what the step bakes in
    besides its source: `compile_cache`), jit executables are kept on disk."""
    if self.kind == "jit":
      return self._lazy(lambda sh: self._cached(compile_train_step(step_fn, self.mesh, donate, sh), "train_step", key))
    psum = lambda tree: jax.lax.psum(tree, "data")  # noqa: E731

    def per_device(state, batch):
      # Each device draws its own dropout masks, as the rows of one jit batch do.
      local = state.replace(rng=jax.random.fold_in(state.rng, jax.lax.axis_index("data")))
      new, metrics = step_fn(local, batch, reduce=psum, sparse_embed=False)
      return new.replace(rng=state.rng), metrics

    return jax.pmap(per_device, axis_name="data", donate_argnums=(0,) if donate else ())

  def compile_eval(self, step_fn: Callable, params_of: Callable = lambda state: state.params, key=None) -> Callable:
    """`step_fn(params, batch, *, reduce)` -> compiled `(state, batch) -> outputs`, evaluating
    `params_of(state)` (e.g. the optimizer's moving average of the weights)."""
    if self.kind == "jit":
      return self._lazy(
        lambda sh: self._cached(
          compile_eval_step(lambda state, batch: step_fn(params_of(state), batch), self.mesh, sh), "eval_step", key
        )
      )
    psum = lambda tree: jax.lax.psum(tree, "data")  # noqa: E731
    return jax.pmap(lambda state, batch: step_fn(params_of(state), batch, reduce=psum), axis_name="data")

  def compile_params_fn(self, fn: Callable, key=None) -> Callable:
    """`fn` over trees in the step's layout (e.g. its parameters): jit on the global arrays, or
    pmap on each device's replica, whose results come back one copy per device like the step's
    metrics (`scalars` takes the first)."""
    return self._cached(jax.jit(fn), fn.__name__, key) if self.kind == "jit" else jax.pmap(fn)

  @staticmethod
  def _cached(jitted: Callable, name: str, key) -> Callable:
    return jitted if key is None else compile_cache.cached(jitted, name, key)

  def _lazy(self, build: Callable) -> Callable:
    """jit once the state's tree is known (its shardings follow from the shapes)."""
    compiled = {}

    def run(state, batch):
      if "fn" not in compiled:
        compiled["fn"] = build(state_shardings(state, self.mesh))
      return compiled["fn"](state, batch)

    return run


def gather(x: jax.Array) -> np.ndarray:
  """A (possibly multi-host) sharded array as one numpy array on every host."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def prefetch(it: Iterator, put: Callable, size: int = 2) -> Iterator:
  """Run `put(next(it))` in a background thread `size` items ahead of the consumer.

  Host-side batching and the host-to-device copy then overlap with the running step.
  Items are `(batch, extra)` pairs; only the batch goes through `put`.
  """
  if size <= 0:
    for batch, extra in it:
      yield put(batch), extra
    return
  q: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()
  done = object()

  def worker():
    try:
      for batch, extra in it:
        if stop.is_set():
          return
        q.put((put(batch), extra))
      q.put(done)
    except BaseException as e:  # surface data errors in the consumer
      q.put(e)

  t = threading.Thread(target=worker, daemon=True)
  t.start()
  try:
    while True:
      item = q.get()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
