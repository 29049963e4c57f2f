"""The canonical trainer: read it top to bottom.

    mesh -> data -> model + params -> optimizer -> state -> restore -> jit steps -> loop

`train_and_evaluate(config, workdir)` is what `main.py`, tests and notebooks call. When an
idea does not fit the seams (model, loss, optimizer), fork this file into `projects/`.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from research import checkpoint, finetune, losses, optim, parallel, run_checks, steps, writers
from research.data import tasks
from research.data.builders import LM_TASKS, glue_data, lm_data, load_tokenizer  # noqa: F401 (re-exported)
from research.models.build import build_model, check_attention, check_same_model  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

LOWER_IS_BETTER = ("loss", "perplexity")


# ---------------------------------------------------------------------------------------
# Pieces the loop is built from.
# ---------------------------------------------------------------------------------------


def teacher_logits(config, train_ex, task) -> np.ndarray:
  """Score the train set once with the teacher run(s), for loss="distill".

  `config.teacher` is one training workdir of this codebase or several, comma-separated (an
  ensemble: their logits are averaged, i.e. the normalized geometric mean of their
  probabilities). Each is read at its best checkpoint, or at `workdir@latest` / `workdir@STEP`.
  """
  from research import predict  # predict imports this module

  if not config.teacher:
    raise ValueError("config.loss='distill' needs config.teacher: a training workdir of this codebase")
  teachers = predict.load_runs(config.teacher)
  if teachers[0].task.name != task.name:
    raise ValueError(f"config.teacher: {config.teacher!r} was trained on {teachers[0].task.name}, not {task.name}")
  for t in teachers:
    log.info("scoring %d train examples with teacher %s (step %d)", len(train_ex), t.workdir, t.step)
  return predict.combined_logits(teachers, train_ex, "ensemble")


class _Preemption:
  """SIGTERM (TPU VM maintenance, Slurm) or a first Ctrl-C -> save at the next step boundary,
  then exit; a second Ctrl-C stops at once (KeyboardInterrupt), keeping the last checkpoint.

  With several processes the signal reaches each at a slightly different step, but all of them
  must save the same step (the save is collective). So every `every` steps they all-gather
  their flags and stop together when any was signalled.
  """

  def __init__(self, every: int = 5):
    self.requested, self.every, self.reason = False, every, "preempted"
    try:
      self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread (e.g. some notebook runners)
      self._old = {}

  def _handle(self, signum, _frame):
    if signum == signal.SIGINT:
      if self.requested:
        raise KeyboardInterrupt
      self.reason = "interrupted"
      log.warning("Ctrl-C: saving a checkpoint at the next step boundary, then exiting (Ctrl-C again: stop now)")
    else:
      log.warning("SIGTERM: saving a checkpoint at the next step boundary, then exiting")
    self.requested = True

  def stop_at(self, step: int) -> bool:
    """Whether every process stops after `step` (the same answer on all of them)."""
    if jax.process_count() == 1:
      return self.requested
    if step % self.every:
      return False
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))

  def restore(self):
    for s, old in self._old.items():
      signal.signal(s, old)


# ---------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  is_main = jax.process_index() == 0
  lm_task = config.task in LM_TASKS
  task = None if lm_task else tasks.get_task(config.task)
  loss_fn = losses.get_loss(config.loss or ("softmax_xent" if lm_task else task.default_loss))
  run_checks.check_run_fields(config)
  run_checks.check_task_fields(config, task)

  # --- Mesh ------------------------------------------------------------------------------
  mesh = parallel.make_mesh(config.num_devices, config.get("fsdp", 1))
  strategy = parallel.Strategy(config.parallel, mesh)
  run_checks.check_batch_sizes(config, mesh, lm_task)
  log.info("mesh %s over %d processes, %s", dict(mesh.shape), jax.process_count(), config.parallel)

  # --- Data ------------------------------------------------------------------------------
  data = lm_data(config, workdir) if lm_task else glue_data(config, task)
  train_iter = data.train_iter
  steps_per_epoch = train_iter.steps_per_epoch
  total_steps = config.num_train_steps or int(np.ceil(config.num_epochs * steps_per_epoch))
  log.info("%s; %d steps/epoch, %d steps", data.description, steps_per_epoch, total_steps)
  best_metric = config.best_metric or data.best_metric
  higher_is_better = best_metric not in LOWER_IS_BETTER

  # --- Model + params ----------------------------------------------------------------------
  init_rng = jax.random.PRNGKey(config.seed)
  dropout_rng = jax.random.key_data(jax.random.key(config.seed + 1, impl=config.rng_impl))
  model, params, arch = build_model(config.model, data.num_outputs, data.vocab_size, init_rng, config.finetune, mesh)
  check_same_model(workdir, arch)  # before anything in the workdir is written
  run_checks.check_length_fits(config, arch, lm_task)
  if config.loss == "distill":
    data.train_enc.extras["teacher_logits"] = teacher_logits(config, data.train_ex, task)

  # --- What trains, and the optimizer over it ------------------------------------------------
  ft = config.finetune
  mask = finetune.trainable_mask(params, ft.strategy, ft.top_k)
  trainable = finetune.partition(params, mask)[0]
  tx, schedule = optim.make_optimizer(config.optimizer, trainable, total_steps, layers=finetune.num_layers(params))
  param_counts = {"trainable_params": finetune.count(trainable), "total_params": finetune.count(params)}
  log.info(
    "model %s, fine-tuning %s: %s of %s parameters trained (%.2f%%)",
    config.model.get("init_from") or config.model.name,  # a loaded checkpoint's own architecture wins
    ft.strategy,
    f"{param_counts['trainable_params']:,}",
    f"{param_counts['total_params']:,}",
    100 * param_counts["trainable_params"] / param_counts["total_params"],
  )
  del trainable

  # --- State, sharded; then restore by precedence -------------------------------------------
  # In the jit layout (replicated, or sharded under fsdp) so Orbax restores into that layout.
  # Pretrained (host) weights go straight to their shards; the optimizer state is created there.
  params = parallel.place_state(params, mesh)
  state = parallel.init_sharded(
    lambda p, r: steps.create_state(p, tx, r, mask), params, dropout_rng, mesh=mesh, donate_argnums=(0,)
  )
  del params
  mode = "max" if higher_is_better else "min"
  ckpt = checkpoint.Checkpointer(
    workdir / "checkpoints", best_metric=best_metric, best_mode=mode, keep_every=config.keep_every_steps
  )
  config_dict = json.loads(config.to_json_best_effort())
  state, data_state, own = _restore(ckpt, config, state, workdir, config_dict)
  if data_state is not None:
    train_iter.set_state(data_state)
  # A resume of this run carries early stopping's count and what its earlier processes spent
  # training; a start from another run's checkpoint (config.resume) takes neither.
  early_stop = data_state.get("early_stop", {}) if own else {}
  seconds_before = data_state.get("train_seconds", 0.0) if own else 0.0

  # Written once the workdir's checkpoints are known to fit this run: config.json records the
  # run; model_config.json is what predict.py / generate.py rebuild the model from.
  if is_main:
    writers.write_atomic(workdir / "config.json", config.to_json_best_effort(indent=2))
    writers.write_atomic(workdir / "model_config.json", json.dumps(arch, indent=2))

  # --- Compiled steps ------------------------------------------------------------------------
  loss_kwargs = config.loss_kwargs.to_dict()
  # One step program per batch shape, without the parameter and update norms (reading them in
  # every step makes XLA copy the parameters); logging steps measure them from a copy of the
  # parameters taken before the step (steps.update_norms).
  step_fn = functools.partial(
    steps.train_step,
    model=model,
    loss_fn=loss_fn,
    tx=tx,
    schedule=schedule,
    grad_accum=config.optimizer.grad_accum,
    loss_kwargs=loss_kwargs,
    rng_impl=config.rng_impl,
    mask=mask,
    rdrop_alpha=config.get("rdrop_alpha", 0.0),
    sam_rho=config.optimizer.get("sam_rho", 0.0),
    # Row-sparse embedding gradients need the fused adamw (and jit: pmap turns them off).
    sparse_embed=config.optimizer.get("sparse_embed_grad", True) and config.optimizer.name == "adamw",
  )
  # What the programs bake in besides their source and argument shapes (compile_cache.py); the
  # seed only picks the initial state's values.
  program_key = {
    "config": {k: v for k, v in config_dict.items() if k != "seed"},
    "arch": arch,
    "total_steps": total_steps,
  }
  train_fn = strategy.compile_train(functools.partial(step_fn, norms=False), donate=config.donate, key=program_key)
  snapshot = strategy.compile_params_fn(steps.copy_params, key={})
  measure_norms = strategy.compile_params_fn(steps.update_norms, key={})
  eval_fn = strategy.compile_eval(
    functools.partial(
      steps.eval_step, model=model, loss_fn=loss_fn, loss_kwargs=loss_kwargs, return_logits=not lm_task
    ),
    params_of=lambda s: optim.ema_params(s.params, s.opt_state),  # the raw weights unless optimizer.ema > 0
    key=program_key,
  )

  # --- Loop ----------------------------------------------------------------------------------
  step = int(state.step)
  state = strategy.put_state(state)  # from here on, the compiled step's layout
  writer = writers.MetricWriter(workdir, resume_step=step)
  ex_per_step = getattr(train_iter, "examples_per_step", config.batch_size)  # packed: a mean
  progress = writers.Progress(total_steps, ex_per_step, step, enabled=config.progress)
  batches = parallel.prefetch(train_iter, strategy.put_batch, size=config.data.prefetch)
  preempt = _Preemption()
  sums = {}
  data_state = train_iter.get_state()
  dev_metrics, t_start = {}, time.perf_counter()

  def host_metrics(pending: tuple[dict, int]) -> dict:
    """Fetch one step's metrics; stop loudly on a non-finite loss before anything is saved."""
    m, at = strategy.scalars(pending[0]), pending[1]
    if m["nonfinite"]:
      raise FloatingPointError(
        f"non-finite loss or gradient at step {at} (loss_sum={m['loss_sum']}, "
        f"grad_norm={m['grad_norm']}); the run stopped before saving it, and the last good "
        f"checkpoint in {workdir / 'checkpoints'} is kept. Lower the learning rate or check the data."
      )
    return m

  def save(at: int, eval_metrics: dict | None = None):
    extra = {
      "early_stop": {"best": best_value, "stale": stale},
      "train_seconds": seconds_before + time.perf_counter() - t_start,
    }
    ckpt.save(at, strategy.get_state(state), data_state | extra, config_dict, metrics=eval_metrics)

  # Early stopping: the best dev value and evals since, saved with the data position so every
  # process resumes with the same count.
  best_value, stale = early_stop.get("best"), early_stop.get("stale", 0)
  stopped_early = (
    bool(config.early_stopping_patience) and stale >= config.early_stopping_patience
  )  # rerun of a stopped run

  def evals_at(s: int) -> bool:
    return s == total_steps or bool(config.eval_every_steps and s % config.eval_every_steps == 0)

  def logs_at(s: int) -> bool:  # these steps measure the parameter and update norms
    return evals_at(s) or s % config.log_every_steps == 0

  pending = None  # the previous step's metrics, fetched one step late to keep the device busy
  try:
    while step < total_steps and not stopped_early:
      batch, next_data_state = next(batches)
      before = snapshot(state.params) if logs_at(step + 1) else None
      state, m = train_fn(state, batch)
      if before is not None:
        m = m | measure_norms(before, state.params)
      if pending is not None:
        _accumulate(sums, host_metrics(pending))
        progress.start(pending[1])  # once the first step (and its compile) is done
      pending, step, data_state = (m, step + 1), step + 1, next_data_state

      do_eval = evals_at(step)
      do_log = logs_at(step) or preempt.requested
      do_save = do_eval or any(n and step % n == 0 for n in (config.checkpoint_every_steps, config.keep_every_steps))
      if do_log or do_save:
        _accumulate(sums, host_metrics(pending))
        pending = None
      if do_log and sums:
        train_m = _summarize(sums) | progress.update(step) | {"epoch": step / steps_per_epoch}
        writer.write(step, "train", train_m)
        sums = {}
        log.info("step %d: %s", step, _fmt(train_m))
      stop_now = preempt.stop_at(step)  # after anything this step did (a signal may arrive mid-step)
      if do_eval:
        dev_metrics = data.evaluate(eval_fn, state, strategy)
        writer.write(step, config.eval_split, dev_metrics)
        log.info("step %d %s: %s", step, config.eval_split, _fmt(dev_metrics))
        value = dev_metrics[best_metric] * (1 if higher_is_better else -1)
        best_value, stale = (value, 0) if best_value is None or value > best_value else (best_value, stale + 1)
        save(step, dev_metrics)
        if config.early_stopping_patience and stale >= config.early_stopping_patience:
          log.info("early stop at step %d: %s has not improved for %d evals", step, best_metric, stale)
          stopped_early = True
          break
      elif do_save or stop_now:
        if pending is not None:  # a signal that came after this step's checks: check before saving
          _accumulate(sums, host_metrics(pending))
          pending = None
        save(step)
      if stop_now:
        ckpt.wait()
        log.warning("%s: saved step %d; rerun the same command to resume", preempt.reason, step)
        return {"step": step, "preempted": True}
    if pending is not None:
      host_metrics(pending)
  finally:
    ckpt.close()
    writer.close()
    preempt.restore()

  best = ckpt.best_step()
  result = {
    "step": step,
    "final": dev_metrics,
    "best_step": best,
    "train_seconds": seconds_before + time.perf_counter() - t_start,  # + earlier processes (to their last save)
    "examples_per_step": ex_per_step,
    "stopped_early": stopped_early,
    **param_counts,
  }
  if best is not None:
    best_metrics = _metrics_at(workdir, best, config.eval_split)
    result["best"] = best_metrics
    log.info(
      "best %s %s=%.4f at step %d", config.eval_split, best_metric, best_metrics.get(best_metric, float("nan")), best
    )
  if is_main:  # a finished run's record; sweep.py skips runs that have one
    writers.write_atomic(workdir / "summary.json", json.dumps(result, indent=2))
  return result


_LATEST = ("grad_norm", "param_norm", "update_norm", "lr")  # logged as their latest measured value


def _restore(ckpt: checkpoint.Checkpointer, config, state, workdir: Path, config_dict: dict):
  """(state, data position, whether it is this run's own) by precedence: the workdir's own
  latest checkpoint, else `config.resume` (another run's checkpoints), else `state` as built
  (pretrained or scratch) with no data position."""
  if ckpt.latest_step() is not None:
    state, data_state = ckpt.restore(ckpt.latest_step(), checkpoint.abstract(state))
    log.info("resumed from %s at step %d", workdir / "checkpoints", int(state.step))
    run_checks.warn_config_changes(workdir / "config.json", config_dict)  # before config.json is rewritten
    return state, data_state, True
  if config.resume:
    other = checkpoint.Checkpointer(
      config.resume, best_metric=ckpt.best_metric, best_mode=ckpt.best_mode, read_only=True
    )
    if other.latest_step() is None:
      raise FileNotFoundError(f"config.resume={config.resume!r} holds no checkpoint")
    state, data_state = other.restore(other.latest_step(), checkpoint.abstract(state))
    log.info("started from %s step %d", config.resume, int(state.step))
    return state, data_state, False
  return state, None, False


def _accumulate(sums: dict, m: dict) -> None:
  for k in ("loss_sum", "count", "correct"):
    sums[k] = sums.get(k, 0.0) + float(m[k])
  for k in _LATEST:
    if not np.isnan(m[k]):  # param/update norms are measured on logging steps only (NaN between)
      sums[k] = float(m[k])  # latest value
  sums["steps"] = sums.get("steps", 0) + 1


def _summarize(s: dict) -> dict:
  out = {"loss": s["loss_sum"] / max(s["count"], 1.0)}
  if s["correct"]:
    out["accuracy"] = s["correct"] / max(s["count"], 1.0)
  # A norm not measured since the last record (a preemption's log right after a logging step) is
  # left out, not written as NaN.
  return out | {k: s[k] for k in _LATEST if k in s}


def _fmt(m: dict) -> str:
  return " ".join(f"{k}={v:.4g}" for k, v in m.items())


def _records(workdir: Path, split: str) -> list[dict]:
  path = workdir / "metrics.jsonl"
  if not path.exists() or jax.process_index() != 0:
    return []
  return [r for r in map(json.loads, path.read_text().splitlines()) if r["split"] == split]


def _metrics_at(workdir: Path, step: int, split: str) -> dict:
  """The eval metrics logged at `step`, read back from metrics.jsonl."""
  return next((r for r in _records(workdir, split) if r["step"] == step), {})
