"""End-to-end SST-2 fine-tuning: our trainer beside transformers' PyTorch `Trainer`, in one run.

    .venv/bin/python benchmarks/finetune_sst2.py --steps 300     # a few minutes per side
    .venv/bin/python benchmarks/finetune_sst2.py                 # one full epoch (2,105 steps) each

Both sides fine-tune the shipped all-MiniLM-L6-v2 with BERT's classifier head (tanh pooler on
[CLS]) on the SST-2 TSVs with the same recipe: batch 32, AdamW lr 5e-5 (eps 1e-6, weight decay
0.01, none on biases/LayerNorm), 10% linear warmup then linear decay, clip 1.0, dropout 0.1, max
length 128, fp32; then one eval over the 872 dev sentences. Each side pads the way it does by
default in its best configuration: ours to a few length buckets, the `Trainer` dynamically per
batch with `group_by_length`. Each runs in its own process (the `Trainer` in the Python 3.11 +
torch 2.13 CPU venv, see benchmarks/train_step.py), so its wall time and peak RSS are its own.
Wall time is the whole process (imports, data, compile, train, eval); train time is each
trainer's own count (ours includes compiling the step programs).

Ours runs twice with the same fresh JAX compilation cache: once cold (every length bucket's
program compiled), once warm (loaded from the cache, as on a rerun or a sweep's later seeds).
`--pack-rows 4` adds two runs of ours with sequence packing (`--config.data.pack_rows=4`: 4
rows of 128 tokens per step, ~37 sentences, one train and one eval program), cold and warm on
their own fresh cache. They cover the same number of examples as the others (`--steps N`
becomes N x 32 sentences' worth of packed steps), so they take fewer, fuller steps.
`--skip-buckets` leaves out the length-bucket runs; `--rng-impl rbg` and `--dropout-bits hash`
(`config.model.dropout_bits`) apply to all our runs.
`--frozen-embeddings` adds packed runs with the embedding block frozen
(`--config.finetune.strategy=top_k --config.finetune.top_k=6`: every layer trains, the 11.9M
embedding parameters get no gradient and no AdamW update): a recipe change, so its row names it,
and its dev accuracy is the check that it costs nothing.
`--matmul-dtype bfloat16` runs ours with bf16 matmul operands (`config.model.matmul_dtype`);
`--trainer-bf16` adds a second `Trainer` run with `bf16=True` (CPU autocast), its mixed
precision; the speed column stays against the fp32 `Trainer`, the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], what: str) -> tuple[str, float, float]:
  """Run `cmd` to completion: (stdout, wall seconds, the process's own peak RSS in GB)."""
  with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0), err.seek(0)
    if proc.returncode:
      raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{err.read()[-4000:]}")
    return out.read(), wall, usage.ru_maxrss / 1e6  # KiB -> GB


SST2_TRAIN = 67349


FROZEN_EMBEDDINGS = ["--config.finetune.strategy=top_k", "--config.finetune.top_k=6"]


def run_ours(
  steps: int,
  seed: int,
  glue_dir: str,
  cache_dir: str,
  label: str,
  pack_rows: int = 0,
  rng_impl: str = "",
  frozen_embeddings: bool = False,
  dropout_bits: str = "",
  matmul_dtype: str = "",
) -> dict:
  work = Path(tempfile.mkdtemp(prefix="ft_sst2_ours_"))
  n = steps or 0
  cmd = [
    sys.executable,
    "-m",
    "research.main",
    "--config=configs/glue.py:task=sst2,model=minilm",
    f"--workdir={work}",
    f"--config.data.glue_dir={glue_dir}",
    f"--config.seed={seed}",
    "--config.progress=false",
    f"--compilation_cache={cache_dir}",
  ]
  if rng_impl:
    cmd.append(f"--config.rng_impl={rng_impl}")
  if dropout_bits:
    cmd.append(f"--config.model.dropout_bits={dropout_bits}")
  if matmul_dtype:
    cmd.append(f"--config.model.matmul_dtype={matmul_dtype}")
  if pack_rows:  # the same examples as `n` steps of 32, in fewer packed steps
    cmd += [f"--config.data.pack_rows={pack_rows}", f"--config.num_epochs={n * 32 / SST2_TRAIN if n else 1}"]
    cmd += ["--config.eval_every_steps=100000", "--config.checkpoint_every_steps=100000"]
  elif n:
    cmd += [f"--config.num_train_steps={n}", f"--config.eval_every_steps={n}", f"--config.checkpoint_every_steps={n}"]
  else:
    cmd += ["--config.num_epochs=1", "--config.eval_every_steps=100000", "--config.checkpoint_every_steps=100000"]
  if frozen_embeddings:
    cmd += FROZEN_EMBEDDINGS
  _, wall, rss = _run(cmd, "our run")
  s = json.loads((work / "summary.json").read_text())
  layout = f"packed {pack_rows} x 128" if pack_rows else "length buckets"
  layout += ", embeddings frozen" if frozen_embeddings else ""
  return {
    "side": f"ours (research.main, jax, {layout}, {label} compile cache"
    + (", rbg" if rng_impl == "rbg" else "")
    + (f", {dropout_bits} dropout draws" if dropout_bits else "")
    + (f", {matmul_dtype} matmuls" if matmul_dtype else "")
    + ")",
    "steps": s["step"],
    "examples": s["step"] * s.get("examples_per_step", 32),
    "train_s": s["train_seconds"],
    "wall_s": wall,
    "dev_acc": s["final"]["accuracy"],
    "rss_gb": rss,
  }


def run_trainer(python: str, steps: int, seed: int, glue_dir: str, model_dir: str, bf16: bool = False) -> dict:
  cmd = [python, __file__, "--worker", "--steps", str(steps), "--seed", str(seed), "--glue_dir", glue_dir]
  cmd += ["--trainer-bf16"] if bf16 else []
  out, wall, rss = _run(cmd + ["--model_dir", model_dir], "Trainer run")
  return json.loads(out.strip().splitlines()[-1]) | {"wall_s": wall, "rss_gb": rss}


def trainer_worker(steps: int, seed: int, glue_dir: str, model_dir: str, bf16: bool = False) -> dict:
  """Runs in the torch venv: transformers' Trainer, the recipe in the module docstring; `bf16`:
  its mixed precision (`TrainingArguments(bf16=True)`: torch.autocast on the CPU)."""
  import csv

  import numpy as np
  import torch
  import transformers

  def read(split):
    with open(Path(glue_dir) / "sst2" / f"{split}.tsv", encoding="utf-8") as f:
      rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"] for r in rows], [int(r["label"]) for r in rows]

  tok = transformers.AutoTokenizer.from_pretrained(model_dir)

  class Data(torch.utils.data.Dataset):
    def __init__(self, split):
      texts, labels = read(split)
      enc = tok(texts, truncation=True, max_length=128)
      self.rows = [
        {"input_ids": i, "attention_mask": m, "labels": y}
        for i, m, y in zip(enc["input_ids"], enc["attention_mask"], labels)
      ]

    def __len__(self):
      return len(self.rows)

    def __getitem__(self, i):
      return self.rows[i]

  train, dev = Data("train"), Data("dev")
  model = transformers.BertForSequenceClassification.from_pretrained(model_dir, num_labels=2)
  per_epoch = int(np.ceil(len(train) / 32))
  total = steps or per_epoch
  args = transformers.TrainingArguments(
    output_dir=tempfile.mkdtemp(prefix="ft_sst2_trainer_"),
    per_device_train_batch_size=32,
    per_device_eval_batch_size=64,
    learning_rate=5e-5,
    adam_epsilon=1e-6,
    weight_decay=0.01,
    max_grad_norm=1.0,
    lr_scheduler_type="linear",
    warmup_steps=int(0.1 * total),
    max_steps=total,
    train_sampling_strategy="group_by_length",
    eval_strategy="no",
    save_strategy="no",
    logging_steps=100,
    report_to=[],
    use_cpu=True,
    seed=seed,
    dataloader_num_workers=0,
    bf16=bf16,
  )

  def accuracy(p):
    return {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}

  trainer = transformers.Trainer(
    model=model,
    args=args,
    train_dataset=train,
    eval_dataset=dev,
    processing_class=tok,
    data_collator=transformers.DataCollatorWithPadding(tok),
    compute_metrics=accuracy,
  )
  out = trainer.train()
  ev = trainer.evaluate()
  return {
    "side": f"transformers {transformers.__version__} Trainer (torch {torch.__version__}, dynamic padding"
    + (", bf16=True)" if bf16 else ")"),
    "steps": out.global_step,
    # each epoch's last batch is partial: count the sentences, not 32 a step
    "examples": out.global_step // per_epoch * len(train) + 32 * (out.global_step % per_epoch),
    "train_s": out.metrics["train_runtime"],
    "dev_acc": ev["eval_accuracy"],
  }


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=0, help="train steps per side; 0 = one epoch (2,105)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--glue_dir", default=None, help="GLUE folder (default: ours, $GLUE_DIR or ../shared/data/glue)")
  p.add_argument("--torch-python", default=None, help="python with torch + transformers (else a venv is made)")
  p.add_argument("--skip-torch", action="store_true")
  p.add_argument("--cold-only", action="store_true", help="skip our second (warm compile cache) run")
  p.add_argument("--pack-rows", type=int, default=0, help="also run ours with sequence packing, this many rows")
  p.add_argument("--skip-buckets", action="store_true", help="only the packed runs of ours (with --pack-rows)")
  p.add_argument("--rng-impl", default="", help="our dropout PRNG: threefry2x32 (default) or rbg")
  p.add_argument("--dropout-bits", default="", help="our dropout draws: jax (default) or hash")
  p.add_argument("--frozen-embeddings", action="store_true", help="also packed runs with the embeddings frozen")
  p.add_argument("--matmul-dtype", default="", help="our dense layers' matmul operands: float32 (default) or bfloat16")
  p.add_argument(
    "--trainer-bf16", action="store_true", help="also run the Trainer with bf16=True (CPU autocast) after its fp32 run"
  )
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--model_dir", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    print(json.dumps(trainer_worker(args.steps, args.seed, args.glue_dir, args.model_dir, args.trainer_bf16)))
    return

  sys.path.insert(0, str(REPO))
  from benchmarks.train_step import ensure_torch_python
  from research.data.sources import default_glue_dir
  from research.models.convert import resolve_pretrained

  glue_dir = str(Path(args.glue_dir or default_glue_dir()).resolve())
  rows = []
  layouts = [(0, False)] if not args.skip_buckets else []  # (pack_rows, embeddings frozen)
  layouts += [(args.pack_rows, False)] if args.pack_rows else []
  layouts += [(args.pack_rows or 4, True)] if args.frozen_embeddings else []
  for pack, frozen in layouts:
    cache = tempfile.mkdtemp(prefix="ft_sst2_jax_cache_")  # empty: the first run compiles, the second loads
    for label in ("cold",) if args.cold_only else ("cold", "warm"):
      rows.append(
        run_ours(
          args.steps,
          args.seed,
          glue_dir,
          cache,
          label,
          pack,
          args.rng_impl,
          frozen_embeddings=frozen,
          dropout_bits=args.dropout_bits,
          matmul_dtype=args.matmul_dtype,
        )
      )
  if not args.skip_torch:
    python = ensure_torch_python(args.torch_python)
    model_dir = str(resolve_pretrained("minilm"))
    rows.append(run_trainer(python, args.steps, args.seed, glue_dir, model_dir))
    ref = rows[-1]  # the Trainer in fp32, its default
    if args.trainer_bf16:
      rows.append(run_trainer(python, args.steps, args.seed, glue_dir, model_dir, bf16=True))
  else:
    ref = None
  print(
    f"SST-2, all-MiniLM-L6-v2, {rows[0]['examples']:.0f} training sentences per side (batch 32; packed: the"
    f" same number in fewer, fuller steps), seed {args.seed}; one dev eval at the end"
  )
  print("| side | steps | train s | train ex/s | wall s | dev acc | peak RSS GB | speed vs Trainer (train / wall) |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    speed = f"{ref['train_s'] / r['train_s']:.2f}x / {ref['wall_s'] / r['wall_s']:.2f}x" if ref else "-"
    print(
      f"| {r['side']} | {r['steps']} | {r['train_s']:.0f} | {r['examples'] / r['train_s']:.0f} | "
      f"{r['wall_s']:.0f} | {100 * r['dev_acc']:.2f} | {r['rss_gb']:.1f} | {speed} |"
    )


if __name__ == "__main__":
  main()
