"""Checks of a run's config before it starts, each failing with the key it is about, and the
comparison of a resumed run's config with the one it was started with. Called by `train.py`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import flax
import jax
import ml_collections

from research import losses, parallel
from research.data import tasks
from research.data.builders import LM_METRICS
from research.models.build import changed_fields

log = logging.getLogger(__name__)


def check_run_fields(config: ml_collections.ConfigDict) -> None:
  """The run's length, batch and interval fields, before any data is read."""
  for key in ("eval_every_steps", "checkpoint_every_steps", "keep_every_steps"):
    if config[key] < 0:
      raise ValueError(f"config.{key}={config[key]}: must be >= 0 (0 = never)")
  for key in ("batch_size", "eval_batch_size", "log_every_steps"):
    if config[key] <= 0:
      raise ValueError(f"config.{key}={config[key]}: must be > 0")
  if config.optimizer.grad_accum < 1:
    raise ValueError(f"config.optimizer.grad_accum={config.optimizer.grad_accum}: must be >= 1")
  if config.num_train_steps < 0:
    raise ValueError(f"config.num_train_steps={config.num_train_steps}: must be >= 0 (0 = config.num_epochs)")
  if not config.num_train_steps and not config.num_epochs > 0:
    raise ValueError(
      f"config.num_train_steps=0 and config.num_epochs={config.num_epochs}: set one of them to the run's length"
    )
  # Dropout bits: threefry (JAX's default) is the same under any sharding, which the
  # sharded == single-device property relies on; "rbg" (XLA's RngBitGenerator) depends on the
  # layout, which pmap's per-device programs do not share with jit's.
  if config.rng_impl != "threefry2x32" and config.parallel == "pmap":
    raise ValueError(f"config.rng_impl={config.rng_impl!r} is supported with parallel='jit' only")


def check_task_fields(config: ml_collections.ConfigDict, task: tasks.Task | None) -> None:
  """The loss fits the task's head, and best_metric is one the eval reports (else the run would
  fail at its first eval)."""
  reported = LM_METRICS if task is None else (*task.metrics, "loss")
  if config.best_metric and config.best_metric not in reported:
    raise ValueError(f"config.best_metric={config.best_metric!r}: the eval reports {', '.join(reported)}")
  if task is not None and config.loss:
    kind, want = losses.KINDS.get(config.loss), "regression" if task.is_regression else "classification"
    if kind and kind != want:
      raise ValueError(f"config.loss={config.loss!r} is a {kind} loss; {task.name} is a {want} task")


def check_batch_sizes(config: ml_collections.ConfigDict, mesh, lm_task: bool) -> None:
  """Each batch divides over the mesh's data axis (and micro-batches); packed rows need a BERT."""
  if not lm_task and config.data.get("pack_rows", 0) > 0:
    if config.model.get("arch", "bert") != "bert":
      raise ValueError(f"config.data.pack_rows needs a BERT model, not config.model.arch={config.model.arch!r}")
    parallel.check_batch_size(config.data.pack_rows, mesh, config.optimizer.grad_accum, name="data.pack_rows")
  else:
    parallel.check_batch_size(config.batch_size, mesh, config.optimizer.grad_accum)
  parallel.check_batch_size(config.eval_batch_size, mesh)


def check_length_fits(config: ml_collections.ConfigDict, arch: dict, lm_task: bool) -> None:
  """The longest sequence the data can give must have a position in the model: found at the
  first batch that long otherwise, which may be hours into the run."""
  key = "seq_len" if lm_task else "max_length"
  limit_key = "block_size" if "block_size" in arch else "max_position_embeddings"
  if limit_key in arch and config.data[key] > arch[limit_key]:
    raise ValueError(f"config.data.{key}={config.data[key]} is longer than the model's {limit_key}={arch[limit_key]}")


def config_changes(saved: Path, now: dict) -> list[str]:
  """ "key: old -> new" for each field that differs from the run's saved config (a resume may
  mean it, as a longer num_train_steps, but a new batch size, say, moves the data position)."""
  if not saved.is_file():
    return []
  old = flax.traverse_util.flatten_dict(json.loads(saved.read_text()), sep=".")
  return changed_fields(old, flax.traverse_util.flatten_dict(now, sep="."), ignore=("progress",))


def warn_config_changes(saved: Path, now: dict) -> None:
  """On the process that writes config.json (the others could read it mid-rewrite)."""
  if jax.process_index() == 0 and (changes := config_changes(saved, now)):
    log.warning("resuming with a config that differs from the run's config.json: %s", "; ".join(changes))
