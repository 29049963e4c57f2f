"""Compile time of the train step: cold, then warm from JAX's persistent compilation cache,
then warm from the executable cache on top of it.

    python benchmarks/compile.py [--shape minilm|shakespeare]

Runs a child process twice with the same fresh cache directory (what research/main.py passes
as --compilation_cache, default ~/.cache/research/jax): the first compiles from scratch and
fills the cache, the second finds the executable there. Each child times tracing + lowering
(Python; the persistent cache cannot skip it) and XLA compilation (what the cache replaces) of
the programs the trainer compiles for training (train.py): the step, with the batch shape it
uses, and the two small programs its logging steps add (a copy of the parameters before the
step, and the parameter/update norms from it); and the whole process.

Then twice more with a fresh executable cache as well (research/compile_cache.py, what
research/main.py passes as --executable_cache): the first of those traces, lowers, compiles (the
XLA cache is still cold for it) and saves; the second computes the key and loads the programs,
which is all a warm start of the trainer does.
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

CHILD = r"""
import functools, json, sys, time
from research import xla_env
xla_env.prepare_process()  # the trainer's XLA:CPU flags and heap setting
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
from configs import glue, pretrain_lm
from research import compile_cache, losses, optim, steps, train
if sys.argv[2] == "minilm":
  c = glue.get_config("model=minilm-scratch")
  model, params, _ = train.build_model(c.model, 2, 30522, jax.random.PRNGKey(0), c.finetune)
  b, L = 32, 128
  batch = {"input_ids": np.ones((b, L), np.int32), "attention_mask": np.ones((b, L), np.int32),
           "token_type_ids": np.zeros((b, L), np.int32), "labels": np.zeros(b, np.int32), "weights": np.ones(b, np.float32)}
else:
  c = pretrain_lm.get_config("model=shakespeare")
  model, params, _ = train.build_model(c.model, 65, 65, jax.random.PRNGKey(0), c.finetune)
  batch = {"input_ids": np.ones((12, 64), np.int32), "labels": np.ones((12, 64), np.int32), "weights": np.ones((12, 64), np.float32)}
tx, sched = optim.make_optimizer(c.optimizer, params, 1000)
state = steps.create_state(params, tx, jax.random.key_data(jax.random.key(1)))
trace_s = compile_s = 0.0
exec_each = []
step = jax.jit(functools.partial(steps.train_step, model=model, loss_fn=losses.get_loss("softmax_xent"), tx=tx,
                                 schedule=sched, norms=False), donate_argnums=0)
programs = ((step, (state, batch)), (jax.jit(steps.copy_params), (state.params,)), (jax.jit(steps.update_norms), (state.params,) * 2))
if sys.argv[3]:  # the executable cache: key + load, or trace + lower + compile + save
  compile_cache.enable(sys.argv[3])
  for i, (fn, args) in enumerate(programs):
    t = time.perf_counter()
    compile_cache.cached(fn, f"program{i}", {"config": c.to_dict()}).compile(*args)
    exec_each.append(time.perf_counter() - t)
else:
  for fn, args in programs:
    t = time.perf_counter()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    lowered.compile()
    trace_s, compile_s = trace_s + t1 - t, compile_s + time.perf_counter() - t1
print(json.dumps({"trace_s": trace_s, "compile_s": compile_s, "exec_s": sum(exec_each), "exec_each": exec_each}))
"""


def child(cache: str, shape: str, executables: str = "") -> dict:
  env = dict(os.environ, PYTHONPATH=str(REPO))
  t = time.perf_counter()
  cmd = [sys.executable, "-c", CHILD, cache, shape, executables]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1]) | {"process_s": time.perf_counter() - t}


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--shape", default="minilm", choices=["minilm", "shakespeare"])
  args = ap.parse_args()
  with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as cache2:
    cold, warm = child(cache, args.shape), child(cache, args.shape)
    exe = str(Path(cache2) / "executables")
    exec_cold, exec_warm = child(cache2, args.shape, exe), child(cache2, args.shape, exe)
  print(
    f"| {args.shape} train step (and the norms' two programs) | trace + lower | XLA compile | both | whole process |\n|---|---|---|---|---|"
  )
  for name, r in (("cold (empty cache)", cold), ("warm (persistent cache)", warm)):
    both = r["trace_s"] + r["compile_s"]
    print(f"| {name} | {r['trace_s']:.2f} s | {r['compile_s']:.2f} s | {both:.2f} s | {r['process_s']:.1f} s |")
  ratio = lambda k: 100 * warm[k] / cold[k]  # noqa: E731
  both = 100 * (warm["trace_s"] + warm["compile_s"]) / (cold["trace_s"] + cold["compile_s"])
  print(f"| warm / cold | {ratio('trace_s'):.0f}% | {ratio('compile_s'):.1f}% | {both:.0f}% | |")
  for name, r in (("executable cache, cold (both caches empty)", exec_cold), ("executable cache, warm", exec_warm)):
    print(f"| {name} | | | {r['exec_s']:.2f} s | {r['process_s']:.1f} s |")
  cold_both = cold["trace_s"] + cold["compile_s"]
  own, other = (100 * exec_warm["exec_s"] / x for x in (exec_cold["exec_s"], cold_both))
  print(f"| executable cache warm / its cold (/ the first cold) | | | {own:.1f}% ({other:.1f}%) | |")
  each = ", ".join(f"{t:.2f}" for t in exec_warm["exec_each"])
  print(f"\nexecutable cache, warm, per program (step, parameter copy, norms): {each} s")


if __name__ == "__main__":
  main()
