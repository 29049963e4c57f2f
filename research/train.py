"""The canonical trainer: read it top to bottom.

    mesh -> data -> model + params -> optimizer -> state -> restore -> jit steps -> loop

`train_and_evaluate(config, workdir)` is what `main.py`, tests and notebooks call. When an
idea does not fit the seams (model, loss, optimizer), fork this file into `projects/`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import transformers

from research import checkpoint, finetune, losses, metrics, optim, parallel, steps, writers
from research.data import lm, pipeline, sources, tasks
from research.models import convert
from research.models.bert import BertClassifier, BertConfig
from research.models.bow import BagOfEmbeddings
from research.models.gpt import GPT, GPTConfig

log = logging.getLogger(__name__)

LM_TASKS = ("lm",)  # causal language modeling on a text corpus (configs/pretrain_lm.py)
LOWER_IS_BETTER = ("loss", "perplexity")


# ---------------------------------------------------------------------------------------
# Pieces the loop is built from.
# ---------------------------------------------------------------------------------------


def load_tokenizer(mc: ml_collections.ConfigDict):
  """The checkpoint's own fast WordPiece tokenizer (or `model.tokenizer` for scratch models)."""
  name = mc.tokenizer or mc.init_from
  if not name:
    raise ValueError("config.model.tokenizer is required when config.model.init_from is empty")
  tok = transformers.AutoTokenizer.from_pretrained(str(convert.resolve_pretrained(name)))
  if not tok.is_fast:
    raise ValueError(f"{name}: no fast tokenizer (tokenizer.json); install `tokenizers`")
  return tok


def build_model(mc: ml_collections.ConfigDict, num_labels: int, vocab_size: int, rng: jax.Array, ft=None):
  """Returns (module, params, architecture dict): pretrained from `init_from`, else random.

  `ft` (config.finetune) adds LoRA adapters when its strategy is "lora"."""
  ids = jnp.zeros((1, 8), jnp.int32)
  if mc.arch == "gpt":
    cfg = GPTConfig(
      vocab_size=mc.vocab_size or vocab_size,
      block_size=mc.block_size,
      num_layers=mc.num_hidden_layers,
      num_heads=mc.num_attention_heads,
      hidden_size=mc.hidden_size,
      dropout=max(mc.hidden_dropout_prob, 0.0),
      bias=mc.bias,
      positions=mc.positions,
    )
    model = GPT(cfg, dtype=jnp.dtype(mc.dtype))
    params = jax.jit(lambda r: model.init(r, ids))(rng)["params"]
    return model, params, {"arch": "gpt", **cfg.to_dict()}
  if mc.arch == "bow":
    if mc.init_from:
      raise ValueError("config.model.arch='bow' is trained from scratch; set config.model.init_from=''")
    cfg = {"arch": "bow", "vocab_size": mc.vocab_size or vocab_size, "hidden_size": mc.hidden_size}
    model = BagOfEmbeddings(cfg["vocab_size"], cfg["hidden_size"], num_labels, dtype=jnp.dtype(mc.dtype))
    return model, jax.jit(lambda r: model.init(r, ids, ids, ids))(rng)["params"], cfg
  if mc.init_from:
    cfg, encoder, heads, _ = convert.load_hf_folder(mc.init_from)
  else:
    cfg = BertConfig(
      vocab_size=mc.vocab_size or vocab_size,
      hidden_size=mc.hidden_size,
      num_hidden_layers=mc.num_hidden_layers,
      num_attention_heads=mc.num_attention_heads,
      intermediate_size=mc.intermediate_size,
      max_position_embeddings=mc.max_position_embeddings,
    )
  overrides = {k: mc[k] for k in ("hidden_dropout_prob", "attention_probs_dropout_prob") if mc[k] >= 0}
  if ft is not None and ft.strategy == "lora":
    overrides |= {"lora_rank": ft.lora_rank, "lora_alpha": ft.lora_alpha, "lora_targets": tuple(ft.lora_targets)}
  cfg = BertConfig(**(cfg.to_dict() | overrides))
  if cfg.vocab_size < vocab_size:
    raise ValueError(f"tokenizer has {vocab_size} tokens but the model's vocab_size is {cfg.vocab_size}")
  model = BertClassifier(cfg, num_labels, dtype=jnp.dtype(mc.dtype), pooling=mc.pooling)
  params = jax.jit(lambda r: model.init(r, ids, ids, ids, train=False))(rng)["params"]
  if mc.init_from:
    params = convert.merge_pretrained(params, encoder, heads, num_labels)
  return model, params, {"arch": "bert", "pooling": mc.pooling, **cfg.to_dict()}


def evaluate(eval_fn, state, enc: pipeline.Encoded, task: tasks.Task, config, strategy) -> tuple[dict, np.ndarray]:
  """Metrics over every example exactly once, and the logits in dataset order."""
  logits_all = np.zeros((len(enc), task.num_labels), np.float32)
  loss_sum = count = 0.0
  for batch in pipeline.eval_batches(
    enc,
    batch_size=config.eval_batch_size,
    buckets=pipeline.bucket_lengths(config.data.buckets, config.data.max_length),
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  ):
    index = batch.pop("index")
    out = eval_fn(state, strategy.put_batch(batch))
    index = strategy.rows(strategy.put_batch({"index": index})["index"])
    logits = strategy.rows(out["logits"])
    keep = index >= 0
    logits_all[index[keep]] = logits[keep]
    sums = strategy.scalars({"loss_sum": out["loss_sum"], "count": out["count"]})
    loss_sum += float(sums["loss_sum"])
    count += float(sums["count"])
  m = metrics.compute(task.metrics, logits_all, enc.labels, task.is_regression)
  return {"loss": loss_sum / max(count, 1.0), **m, "examples": float(len(enc))}, logits_all


def teacher_logits(config, train_ex, task) -> np.ndarray:
  """Score the train set once with the teacher run's best checkpoint (for loss="distill")."""
  from research.predict import Predictor  # predict imports this module

  if not config.teacher:
    raise ValueError("config.loss='distill' needs config.teacher: a training workdir of this codebase")
  teacher = Predictor(config.teacher)
  if teacher.task.name != task.name:
    raise ValueError(f"config.teacher={config.teacher!r} was trained on {teacher.task.name}, not {task.name}")
  log.info("scoring %d train examples with teacher %s (step %d)", len(train_ex), config.teacher, teacher.step)
  return teacher.logits(train_ex)


@dataclasses.dataclass
class Data:
  """What the loop needs from a task's data."""

  train_iter: Any  # next() -> (batch, state after it); get_state / set_state; steps_per_epoch
  evaluate: Callable  # (eval_fn, state, strategy) -> dev metrics
  num_outputs: int  # classes (1 for regression); unused by language models
  vocab_size: int
  best_metric: str
  description: str
  train_ex: Any = None  # GLUE only: for distillation
  train_enc: Any = None


def glue_data(config, task: tasks.Task) -> Data:
  tokenizer = load_tokenizer(config.model)
  d = config.data
  read = functools.partial(
    sources.load_split, task, source=d.source, glue_dir=d.glue_dir, tfds_data_dir=d.tfds_data_dir
  )
  train_ex, dev_ex = read("train"), read(config.eval_split)
  if d.max_train_examples:
    train_ex = train_ex.take(d.max_train_examples)
  if d.max_eval_examples:
    dev_ex = dev_ex.take(d.max_eval_examples)
  train_enc = pipeline.encode(train_ex, tokenizer, d.max_length)
  dev_enc = pipeline.encode(dev_ex, tokenizer, d.max_length)
  buckets = pipeline.bucket_lengths(d.buckets, d.max_length)
  train_iter = pipeline.TrainIterator(
    train_enc,
    batch_size=config.batch_size,
    buckets=buckets,
    seed=config.seed,
    sort_window=d.sort_window,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  pad = pipeline.padding_stats(train_enc, train_iter.plan(0), config.batch_size, buckets)
  description = (
    f"{task.name}: {len(train_ex)} train ({train_ex.origin}) / {len(dev_ex)} {config.eval_split} examples; "
    f"buckets {buckets}, padding {100 * pad['pad_fraction']:.1f}% ({100 * pad['pad_fraction_unbucketed']:.1f}% unbucketed)"
  )
  return Data(
    train_iter=train_iter,
    evaluate=lambda eval_fn, state, strategy: evaluate(eval_fn, state, dev_enc, task, config, strategy)[0],
    num_outputs=task.num_labels,
    vocab_size=len(tokenizer),
    best_metric=task.metrics[0],
    description=description,
    train_ex=train_ex,
    train_enc=train_enc,
  )


def lm_data(config, workdir: Path) -> Data:
  """A text corpus for next-token prediction; the tokenizer is trained here and saved in the workdir."""
  d = config.data
  text = lm.read_text(d.train_files)
  if d.val_files:
    train_text, val_text = text, lm.read_text(d.val_files)
  else:  # the last val_fraction of the text, as nanoGPT splits shakespeare_char
    cut = int(len(text) * (1 - d.val_fraction))
    train_text, val_text = text[:cut], text[cut:]
  tok_dir = workdir / "tokenizer"
  if (tok_dir / lm.CharTokenizer.FILE).exists() or (tok_dir / "tokenizer.json").exists():
    tokenizer = lm.load_tokenizer(workdir)  # a resumed run keeps its vocabulary
  elif d.tokenizer == "char":
    tokenizer = lm.CharTokenizer.train(train_text)
    if jax.process_index() == 0:
      tokenizer.save(tok_dir)
  else:
    tokenizer = load_tokenizer(ml_collections.ConfigDict({"tokenizer": d.tokenizer, "init_from": ""}))
    if jax.process_index() == 0:
      tokenizer.save_pretrained(str(tok_dir))
  train_tokens = lm.tokenize_stream(train_text, tokenizer, d.document)
  val_tokens = lm.tokenize_stream(val_text, tokenizer, d.document)
  train_iter = lm.PackedIterator(
    train_tokens,
    seq_len=d.seq_len,
    batch_size=config.batch_size,
    seed=config.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )

  def evaluate_lm(eval_fn, state, strategy) -> dict:
    sums = {"loss_sum": 0.0, "count": 0.0, "correct": 0.0}
    for batch in lm.eval_batches(
      val_tokens,
      seq_len=d.seq_len,
      batch_size=config.eval_batch_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    ):
      out = strategy.scalars(eval_fn(state, strategy.put_batch(batch)))
      for k in sums:
        sums[k] += float(out[k])
    loss = sums["loss_sum"] / max(sums["count"], 1.0)
    return {
      "loss": loss,
      "perplexity": float(np.exp(min(loss, 50.0))),
      "accuracy": sums["correct"] / max(sums["count"], 1.0),
      "tokens": sums["count"],
    }

  description = (
    f"lm: {len(train_tokens):,} train / {len(val_tokens):,} val tokens ({d.train_files}), "
    f"tokenizer {d.tokenizer} ({len(tokenizer)} tokens), windows of {d.seq_len}"
  )
  return Data(train_iter, evaluate_lm, len(tokenizer), len(tokenizer), "loss", description)


class _Preemption:
  """SIGTERM (TPU VM maintenance, Slurm) -> save at the next step boundary, then exit."""

  def __init__(self):
    self.requested = False
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. some notebook runners)
      self._old = None

  def _handle(self, *_):
    log.warning("SIGTERM: saving a checkpoint at the next step boundary, then exiting")
    self.requested = True

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


# ---------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  lm_task = config.task in LM_TASKS
  task = None if lm_task else tasks.get_task(config.task)
  loss_fn = losses.get_loss(config.loss or ("softmax_xent" if lm_task else task.default_loss))

  # --- Mesh ------------------------------------------------------------------------------
  mesh = parallel.make_mesh(config.num_devices)
  strategy = parallel.Strategy(config.parallel, mesh)
  parallel.check_batch_size(config.batch_size, mesh, config.optimizer.grad_accum)
  parallel.check_batch_size(config.eval_batch_size, mesh)
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
  # Dropout bits: threefry (JAX's default) is the same under any sharding, which the
  # sharded == single-device property relies on; "rbg" (XLA's RngBitGenerator) makes the
  # MiniLM train step ~20% faster on CPU (benchmarks/train_step.py) but depends on the layout.
  if config.rng_impl != "threefry2x32" and config.parallel == "pmap":
    raise ValueError(f"config.rng_impl={config.rng_impl!r} is supported with parallel='jit' only")
  dropout_rng = jax.random.key_data(jax.random.key(config.seed + 1, impl=config.rng_impl))
  model, params, arch = build_model(config.model, data.num_outputs, data.vocab_size, init_rng, config.finetune)
  if is_main:  # what predict.py / generate.py rebuild the model from
    (workdir / "model_config.json").write_text(json.dumps(arch, indent=2))
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
    config.model.name,
    ft.strategy,
    f"{param_counts['trainable_params']:,}",
    f"{param_counts['total_params']:,}",
    100 * param_counts["trainable_params"] / param_counts["total_params"],
  )
  del trainable

  # --- State, sharded; then restore by precedence -------------------------------------------
  state = parallel.replicate(steps.create_state(params, tx, dropout_rng, mask), mesh)
  del params
  mode = "max" if higher_is_better else "min"
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", best_metric=best_metric, best_mode=mode)
  early_stop = {}
  config_dict = json.loads(config.to_json_best_effort())
  if ckpt.latest_step() is not None:
    state, data_state = ckpt.restore(ckpt.latest_step(), checkpoint.abstract(state))
    train_iter.set_state(data_state)
    early_stop = data_state.get("early_stop", {})
    log.info("resumed from %s at step %d", workdir / "checkpoints", int(state.step))
  elif config.resume:
    other = checkpoint.Checkpointer(config.resume, best_metric=best_metric, best_mode=mode, read_only=True)
    if other.latest_step() is None:
      raise FileNotFoundError(f"config.resume={config.resume!r} holds no checkpoint")
    state, data_state = other.restore(other.latest_step(), checkpoint.abstract(state))
    train_iter.set_state(data_state)
    log.info("started from %s step %d", config.resume, int(state.step))

  # --- Compiled steps ------------------------------------------------------------------------
  loss_kwargs = config.loss_kwargs.to_dict()
  train_fn = strategy.compile_train(
    functools.partial(
      steps.train_step,
      model=model,
      loss_fn=loss_fn,
      tx=tx,
      schedule=schedule,
      grad_accum=config.optimizer.grad_accum,
      loss_kwargs=loss_kwargs,
      rng_impl=config.rng_impl,
      mask=mask,
    ),
    donate=config.donate,
  )
  eval_fn = strategy.compile_eval(
    functools.partial(steps.eval_step, model=model, loss_fn=loss_fn, loss_kwargs=loss_kwargs, return_logits=not lm_task)
  )

  # --- Loop ----------------------------------------------------------------------------------
  step = int(state.step)
  state = strategy.put_state(state)  # from here on, the compiled step's layout
  writer = writers.MetricWriter(workdir, resume_step=step)
  progress = writers.Progress(total_steps, config.batch_size, step, enabled=config.progress)
  batches = parallel.prefetch(train_iter, strategy.put_batch, size=config.data.prefetch)
  preempt = _Preemption()
  sums = {}
  data_state = train_iter.get_state()
  dev_metrics, t_start = {}, time.time()

  def host_metrics(pending: tuple[dict, int]) -> dict:
    """Fetch one step's metrics; stop loudly on a non-finite loss before anything is saved."""
    m, at = strategy.scalars(pending[0]), pending[1]
    if m["nonfinite"]:
      raise FloatingPointError(
        f"non-finite loss or gradient at step {at} (loss_sum={m['loss_sum']}, "
        f"grad_norm={m['grad_norm']}); the state was not updated and the last good checkpoint "
        f"in {workdir / 'checkpoints'} is kept. Lower the learning rate or check the data."
      )
    return m

  def save(at: int, eval_metrics: dict | None = None):
    extra = {"early_stop": {"best": best_value, "stale": stale}}
    ckpt.save(at, strategy.get_state(state), data_state | extra, config_dict, metrics=eval_metrics)

  # Early stopping: the best dev value and evals since, saved with the data position so every
  # process resumes with the same count.
  best_value, stale = early_stop.get("best"), early_stop.get("stale", 0)
  stopped_early = (
    bool(config.early_stopping_patience) and stale >= config.early_stopping_patience
  )  # rerun of a stopped run
  pending = None  # the previous step's metrics, fetched one step late to keep the device busy
  try:
    while step < total_steps and not stopped_early:
      batch, next_data_state = next(batches)
      state, m = train_fn(state, batch)
      if pending is not None:
        _accumulate(sums, host_metrics(pending))
      pending, step, data_state = (m, step + 1), step + 1, next_data_state

      is_last = step == total_steps
      do_eval = is_last or (config.eval_every_steps and step % config.eval_every_steps == 0)
      do_log = do_eval or step % config.log_every_steps == 0 or preempt.requested
      do_save = do_eval or (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0)
      if do_log or do_save:
        _accumulate(sums, host_metrics(pending))
        pending = None
      if do_log and sums:
        train_m = _summarize(sums) | progress.update(step) | {"epoch": step / steps_per_epoch}
        writer.write(step, "train", train_m)
        sums = {}
        log.info("step %d: %s", step, _fmt(train_m))
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
      elif do_save or preempt.requested:
        save(step)
      if preempt.requested:
        ckpt.wait()
        log.warning("preempted: saved step %d; rerun the same command to resume", step)
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
    "train_seconds": time.time() - t_start,
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
    (workdir / "summary.json").write_text(json.dumps(result, indent=2))
  return result


def _accumulate(sums: dict, m: dict) -> None:
  for k in ("loss_sum", "count", "correct"):
    sums[k] = sums.get(k, 0.0) + float(m[k])
  for k in ("grad_norm", "param_norm", "update_norm", "lr"):
    sums[k] = float(m[k])  # latest value
  sums["steps"] = sums.get("steps", 0) + 1


def _summarize(s: dict) -> dict:
  out = {"loss": s["loss_sum"] / max(s["count"], 1.0)}
  if s["correct"]:
    out["accuracy"] = s["correct"] / max(s["count"], 1.0)
  return out | {k: s[k] for k in ("grad_norm", "param_norm", "update_norm", "lr")}


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
