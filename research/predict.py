"""Predict with a trained run: a split (with GLUE submission files for test), ad-hoc text, or
export to a Hugging Face folder.

    python -m research.predict --workdir runs/sst2 --split dev
    python -m research.predict --workdir runs/sst2 --split test          # writes SST-2.tsv
    python -m research.predict --workdir runs/sst2 --text "a gorgeous, witty film"
    printf 'first sentence\\tsecond sentence\\n' | python -m research.predict --workdir runs/rte --stdin
    python -m research.predict --workdir runs/sst2 --export_hf exported/sst2
    python -m research.predict --workdir runs/a,runs/b@latest,runs/c --combine soup --split dev

The best checkpoint (by dev metric) is used unless --step (or `workdir@STEP`) says otherwise.
Several comma-separated runs of one task are combined with --combine: `ensemble` averages their
logits, `soup` (Wortsman et al. 2022, a uniform model soup) averages their weights into one
model, which needs the same architecture and head in every run (e.g. seeds of one recipe).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from research import checkpoint, compile_cache, finetune, metrics, optim, xla_env
from research.data import pipeline, sources, tasks
from research.models import convert
from research.models.bert import BertClassifier, BertConfig
from research.models.bow import BagOfEmbeddings
from research.steps import MODEL_INPUTS
from research.train import load_tokenizer

# GLUE leaderboard file names per task (MNLI has two).
SUBMISSION_NAMES = {
  "cola": "CoLA",
  "sst2": "SST-2",
  "mrpc": "MRPC",
  "qqp": "QQP",
  "stsb": "STS-B",
  "mnli": "MNLI",
  "qnli": "QNLI",
  "rte": "RTE",
  "wnli": "WNLI",
}


# What a pretraining run is used for instead of predictions on a GLUE split.
_LM_USES = {
  "lm": "sample from it with python -m research.generate --workdir ...",
  "mlm": "export it with --export_mlm DIR, then fine-tune that folder (config.model.init_from)",
}


class Predictor:
  """A trained run's model, tokenizer and parameters, ready to score texts."""

  def __init__(self, workdir: str | Path, step: str = "best"):
    self.workdir = Path(workdir)
    cfg_path = self.workdir / "config.json"
    if not cfg_path.is_file():
      raise FileNotFoundError(f"{cfg_path}: not a training workdir (no config.json)")
    self.config = ml_collections.ConfigDict(json.loads(cfg_path.read_text()))
    if self.config.task in _LM_USES:
      raise ValueError(f"{self.workdir} is a {self.config.task!r} pretraining run: {_LM_USES[self.config.task]}")
    self.task = tasks.get_task(self.config.task)
    self.tokenizer = load_tokenizer(self.config.model)
    ckpt_dir = self.workdir / "checkpoints"
    metric = self.config.best_metric or self.task.metrics[0]
    self.step, state, _ = checkpoint.restore_on_host(ckpt_dir, checkpoint.choose_step(ckpt_dir, step, metric))
    self.params = optim.ema_params(state["params"], state["opt_state"])  # the evaluated weights
    # The architecture the run trained (written by train.py), so no pretrained folder is needed.
    arch_path = self.workdir / "model_config.json"
    if arch_path.exists():
      arch = json.loads(arch_path.read_text())
    elif self.config.model.init_from:  # workdirs from before model_config.json was written
      bert = convert.read_config(convert.resolve_pretrained(self.config.model.init_from))
      arch = {"arch": "bert", "pooling": self.config.model.get("pooling", "cls"), **bert.to_dict()}
    else:
      raise FileNotFoundError(f"{arch_path}: missing; cannot rebuild the model")
    dtype = jnp.dtype(self.config.model.dtype)
    if arch.get("arch") == "bow":
      self.bert_cfg, self.pooling = None, None
      self.model = BagOfEmbeddings(arch["vocab_size"], arch["hidden_size"], self.task.num_labels, dtype=dtype)
    else:
      self.bert_cfg = BertConfig.from_dict(arch)
      if self.bert_cfg.lora_rank:  # fold the adapters in: a plain BERT from here on
        self.params = finetune.merge_lora(self.params, self.bert_cfg.lora_alpha, self.bert_cfg.lora_rank)
        self.bert_cfg = self.bert_cfg.without_lora()
      self.pooling = arch.get("pooling", "cls")
      self.model = BertClassifier(self.bert_cfg, self.task.num_labels, dtype=dtype, pooling=self.pooling)
    apply = jax.jit(lambda p, b: self.model.apply({"params": p}, *(b[k] for k in MODEL_INPUTS if k in b)))
    # The program bakes in the module (its repr lists every field) besides its source and shapes.
    self._apply = compile_cache.cached(apply, "predict_logits", {"model": repr(self.model)})

  def logits(self, examples: sources.Examples, batch_size: int = 64, params=None) -> np.ndarray:
    """Logits for `examples` (NxC), with this run's weights or the given `params` (same tree)."""
    params = self.params if params is None else params
    enc = pipeline.encode(examples, self.tokenizer, self.config.data.max_length)
    buckets = pipeline.bucket_lengths(self.config.data.buckets, self.config.data.max_length)
    out = np.zeros((len(enc), self.task.num_labels), np.float32)
    for batch in pipeline.eval_batches(enc, batch_size=batch_size, buckets=buckets):
      idx = batch.pop("index")
      logits = np.asarray(self._apply(params, batch))
      out[idx[idx >= 0]] = logits[idx >= 0]
    return out

  def label_names(self, logits: np.ndarray) -> list[str]:
    pred = metrics.predictions(logits, self.task.is_regression)
    if self.task.is_regression:
      return [f"{float(np.clip(p, 0.0, 5.0)):.3f}" for p in pred]
    return [self.task.labels[int(p)] for p in pred]


def load_runs(specs: str, step: str = "best") -> list[Predictor]:
  """Comma-separated `workdir` or `workdir@STEP` (`@latest`, `@best`) -> one Predictor each, all
  of one task."""
  runs, seen = [], {}
  for spec in [t.strip() for t in specs.split(",") if t.strip()]:
    workdir, _, at = spec.partition("@")
    runs.append(Predictor(workdir, at or step))
    if runs[-1].task.name != runs[0].task.name:
      raise ValueError(f"{workdir!r} was trained on {runs[-1].task.name}, {runs[0].workdir} on {runs[0].task.name}")
    member = (Path(workdir).resolve(), runs[-1].step)
    if member in seen:  # e.g. `run,run@latest` where the best step is the latest
      raise ValueError(
        f"{spec!r} and {seen[member]!r} are the same checkpoint (step {member[1]}); it would count twice"
      )
    seen[member] = spec
  if not runs:
    raise ValueError(f"no training workdir in {specs!r}")
  return runs


COMBINE = ("ensemble", "soup")


def combined_logits(runs: list[Predictor], examples: sources.Examples, how: str = "ensemble") -> np.ndarray:
  """Several runs as one model: their logits averaged ("ensemble"), or their weights ("soup")."""
  if len(runs) == 1:
    return runs[0].logits(examples)
  if how == "ensemble":
    return np.mean([r.logits(examples) for r in runs], axis=0)
  if how != "soup":
    raise ValueError(f"--combine={how!r}: expected one of {', '.join(COMBINE)}")
  first = runs[0]
  for r in runs[1:]:
    if diff := _soup_difference(first, r):
      raise ValueError(
        f"--combine=soup averages weights, so every run needs one architecture and head: {r.workdir} "
        f"differs from {first.workdir} ({diff}); use --combine=ensemble"
      )
  soup = jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0), *[r.params for r in runs])
  return first.logits(examples, params=soup)


def _soup_difference(a: Predictor, b: Predictor) -> str:
  """What keeps two runs' weights from being averaged ("" if nothing): the pooling, or the first
  parameter one lacks or has in another shape."""
  if a.pooling != b.pooling:
    return f"pooling {b.pooling} against {a.pooling}"
  fa, fb = (flax.traverse_util.flatten_dict(r.params, sep="/") for r in (a, b))
  for path in sorted(fa.keys() | fb.keys()):
    shape_a, shape_b = (f[path].shape if path in f else "none" for f in (fa, fb))
    if shape_a != shape_b:
      return f"parameter {path}: {shape_b} against {shape_a}"
  return ""


def predict_split(p: Predictor | list[Predictor], split: str, out_dir: Path, combine: str = "ensemble") -> dict:
  """Predict `split` into `out_dir`: for a test split the GLUE submission file only (nothing
  else to leave out when zipping the folder); for a labeled split a predictions
  TSV, a `.json` beside it naming the runs, steps and combination it came from, and the metrics
  returned. A second call into the same `out_dir` replaces the files."""
  runs = p if isinstance(p, list) else [p]
  p = runs[0]
  d = p.config.data
  examples = sources.load_split(p.task, split, source=d.source, glue_dir=d.glue_dir, tfds_data_dir=d.tfds_data_dir)
  logits = combined_logits(runs, examples, combine)
  names = p.label_names(logits)
  out_dir.mkdir(parents=True, exist_ok=True)
  if split.startswith("test"):
    suffix = {"test_matched": "-m", "test_mismatched": "-mm"}.get(split, "")
    path = out_dir / f"{SUBMISSION_NAMES[p.task.name]}{suffix}.tsv"
    path.write_text("index\tprediction\n" + "".join(f"{i}\t{n}\n" for i, n in enumerate(names)))
    return {"file": str(path), "examples": len(names)}
  path = out_dir / f"{p.task.name}_{split}_predictions.tsv"
  path.write_text(
    "index\tprediction\tlabel\n"
    + "".join(f"{i}\t{n}\t{lab}\n" for i, (n, lab) in enumerate(zip(names, examples.labels.tolist())))
  )
  result = {"file": str(path), "examples": len(names)}
  result |= metrics.compute(p.task.metrics, logits, examples.labels, p.task.is_regression)
  provenance = {"runs": [{"workdir": str(r.workdir), "step": r.step} for r in runs], "split": split}
  provenance |= {"combine": combine} if len(runs) > 1 else {}
  path.with_suffix(".json").write_text(json.dumps(provenance | result, indent=2) + "\n")
  return result


def predict_texts(p: Predictor, lines: list[str]) -> list[dict]:
  n_cols = len(p.task.text_columns)
  texts = []
  for i, line in enumerate(lines, 1):
    cols = tuple(c.strip() for c in line.rstrip("\n").split("\t"))
    if len(cols) != n_cols or not all(cols):
      raise ValueError(f"input line {i}: task {p.task.name} needs {n_cols} non-empty tab-separated text(s)")
    texts.append(cols)
  labels = np.zeros(len(texts), np.float32 if p.task.is_regression else np.int32)
  logits = p.logits(sources.Examples(texts, labels, "input"))
  names = p.label_names(logits)
  out = []
  for t, n, lg in zip(texts, names, logits):
    r = {"text": "\t".join(t), "prediction": n}
    if not p.task.is_regression:
      r["probabilities"] = {lab: round(float(x), 4) for lab, x in zip(p.task.labels, jax.nn.softmax(lg))}
    out.append(r)
  return out


def combined_out_dir(runs: list[Predictor], combine: str) -> Path:
  """Where a combination's predictions go by default: a folder in the first run named by the
  combination and its runs and steps, so another combination never replaces its files."""
  members = "\n".join(f"{r.workdir.resolve()}@{r.step}" for r in runs)
  return runs[0].workdir / f"predictions_{combine}_{hashlib.sha256(members.encode()).hexdigest()[:8]}"


def _define_flags() -> None:
  """Flags exist only when this file is the program, so its functions import anywhere."""
  flags.DEFINE_string(
    "workdir", None, "A training workdir (config.json + checkpoints/); several, comma-separated, with --combine."
  )
  flags.DEFINE_enum("combine", None, COMBINE, "Several runs as one: average their logits or their weights.")
  flags.DEFINE_string("step", "best", "best | latest | a step number")
  flags.DEFINE_string("split", None, "Predict a split: dev, test, dev_matched, ...")
  flags.DEFINE_string("out", None, "Where prediction files go (default: WORKDIR/predictions)")
  flags.DEFINE_multi_string("text", [], "Classify this text (pairs: tab-separated); repeatable.")
  flags.DEFINE_bool("stdin", False, "Classify one text (or tab-separated pair) per stdin line.")
  flags.DEFINE_string("export_hf", None, "Write a Hugging Face BertForSequenceClassification folder here.")
  flags.DEFINE_string("export_mlm", None, "Masked-LM run: write a Hugging Face BertForMaskedLM folder here.")
  flags.DEFINE_string("executable_cache", compile_cache.DEFAULT_DIR, compile_cache.FLAG_HELP)
  flags.mark_flag_as_required("workdir")


def export_mlm(workdir: str | Path, out: str | Path, step: str = "best") -> Path:
  """A masked-LM pretraining run -> a `BertForMaskedLM` folder (weights, config, tokenizer),
  which `config.model.init_from` accepts for fine-tuning."""
  from research.data import lm

  workdir = Path(workdir)
  arch = json.loads((workdir / "model_config.json").read_text())
  if arch.get("arch") != "bert_mlm":
    raise ValueError(f"{workdir}: arch={arch.get('arch')!r}; --export_mlm needs a masked-LM run (arch 'bert_mlm')")
  ckpt_dir = workdir / "checkpoints"
  _, state, _ = checkpoint.restore_on_host(ckpt_dir, checkpoint.choose_step(ckpt_dir, step, "loss", mode="min"))
  params = optim.ema_params(state["params"], state["opt_state"])
  return convert.save_hf_mlm_folder(out, params, BertConfig.from_dict(arch), lm.load_tokenizer(workdir))


def main(argv):
  del argv
  for noisy in ("absl", "orbax", "jax._src"):  # checkpoint-restore chatter; errors still show
    logging.getLogger(noisy).setLevel(logging.WARNING)
  xla_env.prepare_process()  # the trainer's XLA:CPU flags (bf16 matmuls need them) and heap setting
  f = flags.FLAGS
  compile_cache.enable(f.executable_cache)
  if f.export_mlm:
    print(f"exported to {export_mlm(f.workdir, f.export_mlm, f.step)}", file=sys.stderr)
    return
  runs = load_runs(f.workdir, f.step)
  if len(runs) > 1:
    if not f.combine or not f.split or f.text or f.stdin or f.export_hf:
      raise app.UsageError("several --workdir runs: give --combine (ensemble or soup) and --split, nothing else")
    for r in runs:
      print(f"# {r.workdir} step {r.step} ({r.task.name})", file=sys.stderr)
    out = Path(f.out) if f.out else combined_out_dir(runs, f.combine)
    print(json.dumps(predict_split(runs, f.split, out, f.combine) | {"combine": f.combine, "runs": len(runs)}))
    return
  p = runs[0]
  print(f"# {p.workdir} step {p.step} ({p.task.name})", file=sys.stderr)
  if f.split:
    print(json.dumps(predict_split(p, f.split, Path(f.out or p.workdir / "predictions"))))
  lines = list(f.text) + (sys.stdin.read().splitlines() if f.stdin else [])
  for r in predict_texts(p, lines) if lines else []:
    print(json.dumps(r))
  if f.export_hf:
    if p.bert_cfg is None or p.pooling != "cls":
      raise app.UsageError(
        "--export_hf: BertForSequenceClassification classifies the pooled [CLS]; this run uses "
        f"{'a bag of embeddings' if p.bert_cfg is None else 'mean pooling'}, which it cannot express"
      )
    id2label = None if p.task.is_regression else dict(enumerate(p.task.labels))
    problem = "regression" if p.task.is_regression else "single_label_classification"
    out = convert.save_hf_folder(
      f.export_hf,
      p.params,
      p.bert_cfg,
      num_labels=p.task.num_labels,
      id2label=id2label,
      problem_type=problem,
      tokenizer=p.tokenizer,
    )
    print(f"exported to {out}", file=sys.stderr)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
