"""The XLA:CPU fusion flag research/main.py sets, on and off, in one run.

    python benchmarks/xla_cpu_flags.py [--steps 200]

Times our jitted train step (median ms over `--steps` after warm-up) for the char-level GPT of
configs/pretrain_lm.py:model=shakespeare (0.8M parameters, batch 12 x 64) with XLA_FLAGS unset
and with `--xla_cpu_experimental_ynn_fusion_type=dot,reduce`, each in its own process (the flag
is read when the backend starts). benchmarks/train_step.py covers the BERT shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLAG = "--xla_cpu_experimental_ynn_fusion_type=dot,reduce"

CHILD = r"""
import functools, json, sys, time
import jax, numpy as np
from configs import pretrain_lm
from research import losses, optim, steps, train
c = pretrain_lm.get_config("model=shakespeare")
model, params, _ = train.build_model(c.model, 65, 65, jax.random.PRNGKey(0), c.finetune)
tx, sched = optim.make_optimizer(c.optimizer, params, 2000)
state = steps.create_state(params, tx, jax.random.key_data(jax.random.key(1)))
fn = jax.jit(functools.partial(steps.train_step, model=model, loss_fn=losses.softmax_xent, tx=tx, schedule=sched), donate_argnums=0)
rng = np.random.default_rng(0)
ids = rng.integers(0, 65, (12, 65)).astype(np.int32)
batch = jax.device_put({"input_ids": ids[:, :-1], "labels": ids[:, 1:], "weights": np.ones((12, 64), np.float32)})
for _ in range(10):
  state, m = fn(state, batch)
jax.block_until_ready(m)
times = []
for _ in range(int(sys.argv[1])):
  t = time.perf_counter(); state, m = fn(state, batch); jax.block_until_ready(m); times.append(time.perf_counter() - t)
print(json.dumps({"ms": 1e3 * float(np.median(times))}))
"""


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--steps", type=int, default=200)
  args = ap.parse_args()
  rows = []
  for label, flags in (("XLA_FLAGS unset", ""), (FLAG, FLAG)):
    env = dict(os.environ, XLA_FLAGS=flags, PYTHONPATH=str(REPO))
    out = subprocess.run(
      [sys.executable, "-c", CHILD, str(args.steps)], env=env, capture_output=True, text=True, check=True
    )
    rows.append((label, json.loads(out.stdout.strip().splitlines()[-1])["ms"]))
  base = rows[0][1]
  print("| XLA:CPU flags | GPT train step (ms, median) | speed-up |\n|---|---|---|")
  for label, ms in rows:
    print(f"| `{label}` | {ms:.1f} | {base / ms:.2f}x |")


if __name__ == "__main__":
  main()
