"""One GEMM for the query/key/value projections, or three? A micro-benchmark of that matmul.

    python benchmarks/qkv_fusion.py [--tokens 4096] [--hidden 384] [--rounds 5]

Times forward + backward (gradients for the input and the three kernels) under `jax.jit` of
x @ Wq, x @ Wk, x @ Wv as three dots (what research/models/bert.py computes), against
x @ concat(Wq, Wk, Wv) then three slices (a fused QKV projection built at run time, which would
keep the parameter tree). Interleaved rounds of 10 calls each; prints the median per call.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tokens", type=int, default=4096, help="rows of x: batch x sequence (32 x 128)")
  ap.add_argument("--hidden", type=int, default=384, help="MiniLM's width")
  ap.add_argument("--rounds", type=int, default=5)
  a = ap.parse_args()
  h = a.hidden
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (a.tokens, h))
  ws = [jax.random.normal(k, (h, h)) * 0.05 for k in keys[1:]]

  def separate(x, ws):
    return sum(jnp.sum(jnp.tanh(x @ w)) for w in ws)

  def fused(x, ws):
    y = x @ jnp.concatenate(ws, axis=1)
    return sum(jnp.sum(jnp.tanh(y[:, i * h : (i + 1) * h])) for i in range(3))

  fns = {name: jax.jit(jax.grad(f, argnums=(0, 1))) for name, f in (("three dots", separate), ("one fused dot", fused))}
  for f in fns.values():
    jax.block_until_ready(f(x, ws))
  times = {name: [] for name in fns}
  for _ in range(a.rounds):
    for name, f in fns.items():
      t = time.perf_counter()
      for _ in range(10):
        jax.block_until_ready(f(x, ws))
      times[name].append((time.perf_counter() - t) / 10 * 1e3)
  base = np.median(times["three dots"])
  print(f"QKV projection fwd+bwd, x {a.tokens}x{h}, {jax.devices()[0].platform}, median of {a.rounds} rounds:")
  for name, ts in times.items():
    print(f"  {name:14s} {np.median(ts):8.2f} ms  ({base / np.median(ts):.2f}x)  rounds: {[round(t, 1) for t in ts]}")


if __name__ == "__main__":
  main()
