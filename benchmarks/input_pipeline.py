"""Input pipeline throughput on SST-2 train, ours beside the Hugging Face example-script recipe.

    python benchmarks/input_pipeline.py [--glue_dir ../shared/data/glue] [--batch_size 32]

Ours: read the TSV, tokenize once with the checkpoint's fast tokenizer (ragged ids), then build
every training batch of one epoch with `TrainIterator` (length-bucketed shapes, seeded shuffle,
checkpointable position). Reference, in the same run: what HF's `run_flax_glue.py` does, i.e.
tokenize with `padding="max_length"` to 128 and slice batches out of the padded arrays.
Both are timed on one process; figures are wall seconds and examples per second, and the
tokens the model would compute on per epoch (padding included), which is what decides the
step time downstream.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main():
  from configs import glue as glue_cfg
  from research.data import pipeline, sources, tasks
  from research.data.builders import load_tokenizer

  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--glue_dir", default=sources.default_glue_dir())
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--pack_rows", type=int, default=4, help="rows of max_length tokens per packed batch")
  args = p.parse_args()
  c = glue_cfg.get_config("task=sst2,model=minilm")
  task = tasks.get_task("sst2")
  tok = load_tokenizer(c.model)
  max_len, buckets = c.data.max_length, pipeline.bucket_lengths(c.data.buckets, c.data.max_length)

  t0 = time.perf_counter()
  ex = sources.load_split(task, "train", source="tsv", glue_dir=args.glue_dir, tfds_data_dir=None)
  t_read = time.perf_counter() - t0
  n = len(ex.labels)

  # Ours: tokenize once (ragged), then assemble one epoch of bucketed batches.
  t0 = time.perf_counter()
  enc = pipeline.encode(ex, tok, max_len)
  t_tok = time.perf_counter() - t0

  def one_epoch(pack_rows: int) -> tuple:
    """(tokenize s, plan + assemble s, token slots, batches) for one epoch of our iterator."""
    it = pipeline.TrainIterator(
      enc, batch_size=args.batch_size, buckets=buckets, seed=0, sort_window=c.data.sort_window, pack_rows=pack_rows
    )
    t0 = time.perf_counter()
    tokens, steps = 0, it.steps_per_epoch  # the plan (first fit, for packing) is made here
    for _ in range(steps):
      batch, _ = next(it)
      tokens += batch["input_ids"].size
    return (t_tok, time.perf_counter() - t0, tokens, steps)

  ours, packed = one_epoch(0), one_epoch(args.pack_rows)

  # Reference: pad everything to max_length at tokenization, slice batches in a shuffled order.
  t0 = time.perf_counter()
  cols = list(zip(*ex.texts))
  out = tok(*cols, truncation=True, max_length=max_len, padding="max_length", return_tensors="np")
  t_tok_ref = time.perf_counter() - t0
  perm = np.random.default_rng(0).permutation(n)
  t0 = time.perf_counter()
  tokens_ref, steps_ref = 0, 0
  for s in range(0, n - args.batch_size + 1, args.batch_size):  # drop_last, as the script does
    idx = perm[s : s + args.batch_size]
    batch = {k: out[k][idx] for k in ("input_ids", "token_type_ids", "attention_mask")}
    tokens_ref += batch["input_ids"].size
    steps_ref += 1
  t_batch_ref = time.perf_counter() - t0

  print(f"SST-2 train: {n} examples, read in {t_read:.2f} s; batch {args.batch_size}, max_length {max_len}")
  ref = (t_tok_ref, t_batch_ref, tokens_ref, steps_ref)
  cols = {"ours (bucketed)": ours, f"ours (packed {args.pack_rows} x {max_len})": packed, "HF script (padded)": ref}
  print(f"{'':34s}" + "".join(f"{k:>24s}" for k in cols))
  rows = [
    ("tokenize (s)", lambda r: f"{r[0]:.2f}"),
    ("assemble one epoch of batches (s)", lambda r: f"{r[1]:.2f}"),
    ("batches / s", lambda r: f"{r[3] / r[1]:,.0f}"),
    ("examples / s (tokenize + batch)", lambda r: f"{n / (r[0] + r[1]):,.0f}"),
    ("token slots computed per epoch", lambda r: f"{r[2]:,}"),
    ("relative model work per epoch", lambda r: f"{r[2] / tokens_ref:.2f}x"),
  ]
  for name, fmt in rows:
    print(f"{name:34s}" + "".join(f"{fmt(r):>24s}" for r in cols.values()))


if __name__ == "__main__":
  main()
