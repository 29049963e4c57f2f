"""Each task's data for the trainer: a resumable train iterator and a dev evaluation.

`glue_data` (a GLUE task, from TSV or TFDS), `lm_data` (a text corpus for causal or masked LM
pretraining). Each returns a `Data`, the one seam `train.py` reads data through.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import transformers

from research import metrics
from research.data import lm, pipeline, sources, tasks
from research.models import convert

LM_TASKS = ("lm", "mlm")  # causal / masked language modeling on a text corpus
LM_METRICS = ("loss", "perplexity", "accuracy")  # what evaluate_lm reports (besides the token count)


def load_tokenizer(mc: ml_collections.ConfigDict):
  """The checkpoint's own fast WordPiece tokenizer (or `model.tokenizer` for scratch models)."""
  name = mc.tokenizer or mc.init_from
  if not name:
    raise ValueError("config.model.tokenizer is required when config.model.init_from is empty")
  key = "config.model.tokenizer" if mc.tokenizer else "config.model.init_from"
  try:
    folder = convert.resolve_pretrained(name)
  except convert.WeightsError as e:
    raise convert.WeightsError(f"{key}: {e}") from None
  if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.txt")):
    raise ValueError(f"{key}={name!r}: no tokenizer in {folder} (tokenizer.json or vocab.txt)")
  tok = transformers.AutoTokenizer.from_pretrained(str(folder))
  if not tok.is_fast:
    raise ValueError(f"{name}: no fast tokenizer (tokenizer.json); install `tokenizers`")
  return tok


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
    pack_rows=config.data.get("pack_rows", 0),
    max_segments=config.data.get("pack_max_segments", 16),
  ):
    index = batch.pop("index")
    out = eval_fn(state, strategy.put_batch(batch))
    index = strategy.rows(strategy.put_batch({"index": index})["index"]).reshape(-1)  # packed: RxS slots
    logits = strategy.rows(out["logits"])
    keep = index >= 0
    logits_all[index[keep]] = logits[keep]
    sums = strategy.scalars({"loss_sum": out["loss_sum"], "count": out["count"]})
    loss_sum += float(sums["loss_sum"])
    count += float(sums["count"])
  m = metrics.compute(task.metrics, logits_all, enc.labels, task.is_regression)
  return {"loss": loss_sum / max(count, 1.0), **m, "examples": float(len(enc))}, logits_all


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
  d = config.data
  if d.max_length < 3 or min(d.buckets, default=1) < 1 or d.get("pack_rows", 0) < 0:  # [CLS] text [SEP] at the least
    raise ValueError(
      f"config.data.max_length={d.max_length}, buckets={tuple(d.buckets)}, pack_rows={d.get('pack_rows', 0)}: "
      "expected max_length >= 3, buckets >= 1 and pack_rows >= 0 (0 = one example a row)"
    )
  tokenizer = load_tokenizer(config.model)
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
    pack_rows=d.pack_rows,
    max_segments=d.pack_max_segments,
  )
  pad = pipeline.padding_stats(train_enc, train_iter.plan(0), d.pack_rows or config.batch_size, buckets)
  if d.pack_rows:
    layout = (
      f"packed {d.pack_rows} x {d.max_length} tokens per step (~{train_iter.examples_per_step:.1f} examples), "
      f"padding {100 * pad['pad_fraction']:.1f}% ({100 * pad['pad_fraction_unbucketed']:.1f}% one per row unbucketed)"
    )
  else:
    layout = f"buckets {buckets}, padding {100 * pad['pad_fraction']:.1f}% ({100 * pad['pad_fraction_unbucketed']:.1f}% unbucketed)"
  description = (
    f"{task.name}: {len(train_ex)} train ({train_ex.origin}) / {len(dev_ex)} {config.eval_split} examples; {layout}"
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
  if d.seq_len < 1 or not 0.0 <= d.val_fraction < 1.0:
    raise ValueError(
      f"config.data.seq_len={d.seq_len}, val_fraction={d.val_fraction}: expected seq_len >= 1, 0 <= val_fraction < 1"
    )
  text = lm.read_text(d.train_files)
  if d.val_files:
    train_text, val_text = text, lm.read_text(d.val_files, key="config.data.val_files")
    val_source = f"config.data.val_files={d.val_files}"
  else:  # the last val_fraction of the text, as nanoGPT splits shakespeare_char
    cut = int(len(text) * (1 - d.val_fraction))
    train_text, val_text = text[:cut], text[cut:]
    val_source = f"the last config.data.val_fraction={d.val_fraction} of config.data.train_files={d.train_files}"
  tok_dir = workdir / "tokenizer"
  if (tok_dir / lm.CharTokenizer.FILE).exists() or (tok_dir / "tokenizer.json").exists():
    tokenizer = lm.load_tokenizer(workdir)  # a resumed run keeps its vocabulary
  elif d.tokenizer == "char":
    # Every character of the corpus, validation text included, as nanoGPT's shakespeare_char:
    # a character that only the validation text holds would otherwise have no id.
    tokenizer = lm.CharTokenizer.train(train_text + val_text)
    if jax.process_index() == 0:
      tokenizer.save(tok_dir)
  else:
    tokenizer = load_tokenizer(ml_collections.ConfigDict({"tokenizer": d.tokenizer, "init_from": ""}))
    if jax.process_index() == 0:
      tokenizer.save_pretrained(str(tok_dir))
  train_tokens = lm.tokenize_stream(train_text, tokenizer, d.document)
  val_tokens = lm.tokenize_stream(val_text, tokenizer, d.document)
  masker = (
    lm.MaskedLM(tokenizer, d.mask_prob, d.whole_word, d.get("mask_count", "bernoulli"))
    if config.task == "mlm"
    else None
  )
  try:
    train_iter = lm.PackedIterator(
      train_tokens,
      seq_len=d.seq_len,
      batch_size=config.batch_size,
      seed=config.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      masker=masker,
    )
  except ValueError as e:  # too small a corpus: name it
    raise ValueError(f"config.data.train_files={d.train_files}: {e}") from None
  if len(val_tokens) < 2:  # no target to predict: the eval would report a loss of 0
    raise ValueError(f"{val_source}: {len(val_tokens)} validation tokens, nothing to evaluate on")

  def evaluate_lm(eval_fn, state, strategy) -> dict:
    sums = {"loss_sum": 0.0, "count": 0.0, "correct": 0.0}
    for batch in lm.eval_batches(
      val_tokens,
      seq_len=d.seq_len,
      batch_size=config.eval_batch_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      masker=masker,
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
    f"{config.task}: {len(train_tokens):,} train / {len(val_tokens):,} val tokens ({d.train_files}), "
    f"tokenizer {d.tokenizer} ({len(tokenizer)} tokens), windows of {d.seq_len}"
  )
  return Data(train_iter, evaluate_lm, len(tokenizer), len(tokenizer), "loss", description)
