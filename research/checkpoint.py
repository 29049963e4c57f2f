"""Orbax checkpoints of {state, data position, config}, keeping the latest and the best, and
optionally every checkpoint whose step is a multiple of `keep_every` (for weight averaging
along a run, or for analysis after it).

Resume precedence (see `train.py`): the workdir's own latest checkpoint > `config.resume`
(another run's checkpoint folder) > `config.init_from` (pretrained weights) > scratch.
Restoring passes the target shardings, so a checkpoint written on N devices restores on M.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

log = logging.getLogger(__name__)


class _SavesBetweenEvals(logging.Filter):
  """Drops Orbax's warning for a save without metrics. The trainer saves between evals on
  purpose (checkpoint_every_steps, preemption); such a step is kept as the latest, never ranked
  as the best (BestN(keep_checkpoints_without_metrics=False)), so the warning is noise."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_SavesBetweenEvals())  # orbax logs through absl's logger


class MismatchError(ValueError):
  """A checkpoint whose train state does not fit this run's (model, optimizer, strategy)."""


class UnreadableCheckpointError(OSError):
  """A checkpoint whose files cannot be read: damaged or cut short, not merely another shape."""


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` with the three items we save."""

  def __init__(
    self,
    directory: str | Path,
    *,
    best_metric: str,
    best_mode: str = "max",
    keep_every: int = 0,
    read_only: bool = False,
  ):
    self.directory, self.best_metric, self.best_mode = Path(directory), best_metric, best_mode
    reverse = best_mode == "min"

    def metric(m: dict[str, float]) -> float:
      return m[best_metric]

    # Keep the newest (to resume), the best by dev metric (to use) and, if asked, every
    # `keep_every` steps. `best_fn` with `max_to_keep` would delete the newest step, so the
    # policy is spelled out.
    keep = [
      cm.LatestN(n=1),
      cm.BestN(get_metric_fn=metric, reverse=reverse, n=1, keep_checkpoints_without_metrics=False),
    ]
    if keep_every:
      keep.append(cm.EveryNSteps(interval_steps=keep_every))
    policy = cm.AnyPreservationPolicy(keep)
    options = ocp.CheckpointManagerOptions(
      best_fn=metric,
      best_mode=best_mode,
      preservation_policy=policy,
      enable_async_checkpointing=True,
      read_only=read_only,
      create=not read_only,
    )
    _whole_arrays_on_cpu()
    self.manager = ocp.CheckpointManager(
      Path(directory).resolve(), item_names=("state", "data", "config"), options=options
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return self.manager.best_step()

  def save(self, step: int, state, data: dict, config: dict, metrics: dict[str, float] | None = None) -> None:
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data), config=ocp.args.JsonSave(config)
    )
    self.manager.save(step, args=args, metrics=metrics, force=True)

  def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
    """Restore into the shapes, dtypes and shardings of `abstract_state`."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
    try:
      out = self.manager.restore(step, args=args)
    except MemoryError:
      raise
    except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many kinds; say which case it is
      raise self._restore_error(step, abstract_state, e) from e
    return out.state, out.data

  def _restore_error(self, step: int, abstract_state, error: Exception) -> Exception:
    """A failed restore is one of two things: a state of another shape (another model,
    optimizer or strategy wrote it), told by the saved tree, or files that cannot be read (a
    full disk, a copy cut short). The second must not be reported as the first."""
    difference = _tree_difference(_saved_state_metadata(self.directory, step), abstract_state)
    if difference:
      return MismatchError(
        f"{self.directory}: the checkpoint at step {step} does not fit this run's train state ({difference}); "
        "it was written with a different model, optimizer or fine-tuning strategy. Use a new --workdir, "
        "or pass the old one as --config.resume only if the state matches."
      )
    return _unreadable(self.directory, step, error, self.manager.all_steps())

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _unreadable(directory: Path, step: int, error: Exception, saved_steps) -> UnreadableCheckpointError:
  """The error for a checkpoint whose files failed to read: the innermost reason, and what to do."""
  root = error
  while root.__cause__ is not None:  # tensorstore's own message names the file and the array
    root = root.__cause__
  first = str(root).strip().splitlines()[0] if str(root).strip() else type(root).__name__
  others = sorted(s for s in saved_steps if s != step)
  where = Path(directory) / str(step)
  return UnreadableCheckpointError(
    f"{where}: the checkpoint cannot be read ({type(root).__name__}: {first}); its files may be damaged "
    "(a full disk, a copy cut short). Nothing was changed. "
    + (
      f"Other saved steps: {others}; to use the latest of them, move {where} out of the checkpoints folder."
      if others
      else "No other step is saved; a new --workdir starts afresh."
    )
  )


def _state_reader(directory: str | Path) -> ocp.CheckpointManager:
  """A read-only manager of a checkpoints folder that knows the "state" item without a target:
  its metadata (the saved tree's shapes and dtypes) and a restore into any layout."""
  return ocp.CheckpointManager(
    Path(directory).resolve(),
    item_handlers={"state": ocp.StandardCheckpointHandler()},
    options=ocp.CheckpointManagerOptions(read_only=True),
  )


def _saved_state_metadata(directory: Path, step: int) -> Any:
  """The saved train state's tree of array metadata (shape, dtype), or None if unreadable."""
  try:
    return _state_reader(directory).item_metadata(step).state
  except Exception:  # noqa: BLE001 - no metadata: then the files are what is wrong
    return None


def _tree_difference(saved, target) -> str:
  """The first difference between a saved state's metadata and the restore target, by key
  path ("" if none, or if `saved` is None): a leaf on one side only, or another shape/dtype."""
  if saved is None:
    return ""

  def by_path(tree) -> dict[str, Any]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf for path, leaf in flat}

  have, want = by_path(saved), by_path(target)
  if missing := sorted(want.keys() - have.keys()):
    return f"this run has {missing[0]}, the checkpoint does not"
  if extra := sorted(have.keys() - want.keys()):
    return f"the checkpoint has {extra[0]}, this run does not"
  for path in sorted(want):
    a, b = have[path], want[path]
    if (tuple(a.shape), str(a.dtype)) != (tuple(b.shape), str(b.dtype)):
      return f"{path}: saved {a.dtype}{list(a.shape)}, this run {b.dtype}{list(b.shape)}"
  return ""


def _whole_arrays_on_cpu() -> None:
  """On CPU devices, save each replicated array from one replica, whole.

  Orbax's default (replica-parallel saving) has every replica write a slice of a replicated
  array, which spreads device-to-host copies over accelerators. CPU devices share the host's
  memory, so the slices buy nothing, and each is an eager `slice` that XLA compiles once per
  shape: 3.3 of a 19 s test run on 8 fake devices went there. The files are the same either way.
  """
  if jax.default_backend() != "cpu":
    return
  current = ocp.type_handlers.get_type_handler(jax.Array)
  if not getattr(current, "_use_replica_parallel", False):
    return  # already done, or a handler the user registered
  handler = ocp.type_handlers.ArrayHandler(
    array_metadata_store=getattr(current, "_array_metadata_store", None), use_replica_parallel=False
  )
  absl_log = logging.getLogger("absl")  # orbax warns about every override
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)
  try:
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  finally:
    absl_log.setLevel(level)


def abstract(tree) -> Any:
  """ShapeDtypeStructs with shardings, the restore target for `tree`."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def restore_on_host(directory: str | Path, step: int | None = None) -> tuple[int, Any, dict]:
  """(step, state tree, metrics) onto one local device, whatever topology saved it.

  For prediction, export and inspection: no optimizer or mesh is needed.
  """
  mngr = _state_reader(directory)
  saved = mngr.all_steps()
  if not saved:
    raise FileNotFoundError(f"{directory}: no checkpoint")
  step = mngr.latest_step() if step is None else step
  if step not in saved:
    raise FileNotFoundError(f"{directory}: no checkpoint at step {step}; saved steps: {sorted(saved)}")
  one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  try:
    meta = mngr.item_metadata(step).state
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device), meta)
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
  except MemoryError:
    raise
  except Exception as e:  # noqa: BLE001 - the target is the saved tree itself: the files are at fault
    raise _unreadable(Path(directory), step, e, saved) from e
  return step, state, mngr.metrics(step) or {}


def choose_step(directory: str | Path, step: str, metric: str, mode: str = "max") -> int | None:
  """A `--step` argument: "best" (by the saved `metric`, else the latest), "latest" (None), or
  a step number."""
  if step == "best":
    return best_or_latest(directory, metric, mode)
  if step == "latest":
    return None
  if not step.isdigit():
    raise ValueError(f"step {step!r}: expected best, latest or a step number")
  return int(step)


def best_or_latest(directory: str | Path, metric: str, mode: str = "max") -> int | None:
  """The step with the best saved `metric`, else the latest step."""
  mngr = ocp.CheckpointManager(Path(directory).resolve(), options=ocp.CheckpointManagerOptions(read_only=True))
  scored = [(m[metric], s) for s in mngr.all_steps() if (m := mngr.metrics(s)) and metric in m]
  if scored:
    return (max(scored) if mode == "max" else min(scored))[1]
  return mngr.latest_step()
