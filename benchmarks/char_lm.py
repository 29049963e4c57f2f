"""Char-level GPT on Tiny Shakespeare: our trainer vs nanoGPT's documented CPU baseline, one run.

nanoGPT's README gives this CPU baseline (4 layers, 4 heads, 128 wide, context 64, batch 12,
2000 iterations, val loss about 1.88):

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 \
        --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 \
        --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

This script runs that command in a nanoGPT checkout (`--nanogpt_dir`, with
data/shakespeare_char prepared, under `--torch_python`), then our
`python -m research.main --config configs/pretrain_lm.py:model=shakespeare` with the same
model shape, context and batch, for each seed, and prints wall times (the whole command:
imports, compilation with a cold cache, training and evals) and final validation losses
side by side. nanoGPT's val loss is its own estimate (20 random batches of 12 x 64); ours is
exact, over every validation token. Without `--nanogpt_dir` only our runs are timed.

    python benchmarks/char_lm.py --nanogpt_dir /path/to/nanoGPT --torch_python /path/to/venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NANOGPT_ARGS = [
  "config/train_shakespeare_char.py",
  "--device=cpu",
  "--compile=False",
  "--eval_iters=20",
  "--log_interval=1",
  "--block_size=64",
  "--batch_size=12",
  "--n_layer=4",
  "--n_head=4",
  "--n_embd=128",
  "--max_iters=2000",
  "--lr_decay_iters=2000",
  "--dropout=0.0",
]


def run_nanogpt(folder: str, python: str) -> dict:
  t0 = time.perf_counter()
  out = subprocess.run([python, "train.py", *NANOGPT_ARGS], cwd=folder, capture_output=True, text=True, check=True)
  wall = time.perf_counter() - t0
  val = [float(v) for v in re.findall(r"val loss ([0-9.]+)", out.stdout)]
  return {"who": "nanoGPT (torch eager, 2000 iters)", "wall_s": wall, "val_loss": val[-1]}


def run_ours(seed: int, extra: list[str]) -> dict:
  with tempfile.TemporaryDirectory() as wd:
    cmd = [
      sys.executable,
      "-m",
      "research.main",
      "--config=configs/pretrain_lm.py:model=shakespeare",
      f"--workdir={wd}",
      f"--config.seed={seed}",
      "--config.progress=false",
      "--compilation_cache=",  # cold compile, every time
      *extra,
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    summary = json.loads((Path(wd) / "summary.json").read_text())
  return {
    "who": f"ours (jax, seed {seed}, {summary['step']} steps)",
    "wall_s": wall,
    "val_loss": summary["final"]["loss"],
  }


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--nanogpt_dir", default="")
  ap.add_argument("--torch_python", default="python3")
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument(
    "--ours",
    default="",
    help="overrides for our run (default: the `shakespeare` preset: rotary positions, lr 2e-3, 1500 steps)",
  )
  args = ap.parse_args()
  rows = []
  if args.nanogpt_dir:
    rows.append(run_nanogpt(args.nanogpt_dir, args.torch_python))
    print(rows[-1], flush=True)
  for seed in [int(s) for s in args.seeds.split(",") if s]:
    rows.append(run_ours(seed, args.ours.split()))
    print(rows[-1], flush=True)
  print("\n| run | wall time (whole command) | final val loss |\n|---|---|---|")
  for r in rows:
    print(f"| {r['who']} | {r['wall_s']:.1f} s | {r['val_loss']:.4f} |")


if __name__ == "__main__":
  main()
