"""Train-step throughput: our jitted step beside transformers' PyTorch BERT, in one run.

    .venv/bin/python benchmarks/train_step.py --shapes minilm bert-base
    .venv/bin/python benchmarks/train_step.py --remat --skip-torch   # + a row with remat on
    .venv/bin/python benchmarks/train_step.py --fused xla --skip-torch   # + einsum vs fused attention
    .venv/bin/python benchmarks/train_step.py --every-token        # + our last layer over every token
    .venv/bin/python benchmarks/train_step.py --hf-flax            # + Hugging Face's Flax BERT, jitted
    .venv/bin/python benchmarks/train_step.py --optimizer-levers --skip-torch   # + optax's AdamW chain, + norms
    .venv/bin/python benchmarks/train_step.py --hash-dropout      # + dropout draws from an index hash
    .venv/bin/python benchmarks/train_step.py --dense-embed-grad  # + the embedding gradient dense
    .venv/bin/python benchmarks/train_step.py --hash-dropout --skip-torch --rounds 4 --profile
                        # the A/B four times interleaved, and where each step's op time goes
    .venv/bin/python benchmarks/train_step.py --bf16-matmul --torch-bf16
                        # + bf16 matmul operands (ours) beside PyTorch under CPU autocast (bf16)
    .venv/bin/python benchmarks/train_step.py --default-malloc --torch-keep-malloc
                        # + ours with glibc's default malloc, + PyTorch with the trainer's heap setting

Both sides train BertForSequenceClassification-shaped models (2 labels) with AdamW, fp32,
dropout on, on the same batch/sequence shape; each runs in its own subprocess so peak RSS
is its own. The PyTorch reference runs from a side venv (Python 3.11 + torch 2.13 CPU),
created on first use under ~/.cache/research/torchref unless --torch-python is given.
`--hf-flax` adds Hugging Face's `FlaxBertForSequenceClassification` (transformers 4.57.6, the
last release with Flax models) trained by a jitted step as in its `run_flax_glue.py`, on the same
jax/jaxlib/flax/optax versions as ours, from a side venv (~/.cache/research/hfflax, or
--hf-flax-python): the same compiler, so that column compares model and step code alone.

FLOPs per train step (the formula PERF_NOTES uses; XLA's cost analysis agrees within 3%):
    6 * N * T + 12 * L * s^2 * h * B,   N = L * (4h^2 + 2hI) non-embedding matrix params,
T = B * s tokens. The machine's fp32 matmul peak is measured in the same run (numpy/OpenBLAS,
the best of the three BLAS paths here), and % of peak = achieved GFLOP/s / peak.
Our classifier runs its last layer for the [CLS] query alone (`model.last_layer_cls_only`, the
default: the head reads nothing else, and the logits are the same); `--every-token` adds a row
with the last layer over all tokens, as HF computes it. GFLOP/s and % of peak count the formula
above in every row, so for the [CLS]-only rows they are HF-equivalent throughput; XLA's own count
of the FLOPs it ran is printed below the table.
"XLA temp GB" is the compiled step's scratch memory (XLA's memory analysis: activations kept
for the backward pass and workspace), which rematerialization (`--remat`) trades for compute.
Our step is the trainer's step between logging steps: the fused AdamW (`research/optim.adamw`)
and no parameter/update norms, with the word embeddings' gradient taken as the rows the batch
looked up (`optimizer.sparse_embed_grad`). `--optimizer-levers` adds a row with optax's chain
(clip_by_global_norm -> adamw with the decay mask, dense gradients) in its place, and a row with
the norms on (the program the trainer runs on its logging steps); `--dense-embed-grad` a row
with the embedding gradient dense (a zero-filled 30,522 x H array with the batch's rows added in).
`--bf16-matmul` adds our step with `model.matmul_dtype=bfloat16` (the dense layers' matmuls take
bf16 operands into fp32, forward and backward; all else fp32), and `--torch-bf16` PyTorch under
`torch.autocast("cpu", torch.bfloat16)` (oneDNN's bf16 kernels; its matmul outputs are bf16):
the two mixed-precision modes, compared with each other and with the fp32 PyTorch row. The
"% of peak" column stays against the fp32 peak. Every JAX worker runs with the trainer's XLA:CPU
flags and heap setting (`research/xla_env.py`: malloc keeps freed memory, and steps run on the
calling thread, so XLA's per-step scratch buffer is not page-faulted in afresh each step); the
PyTorch rows run with glibc's malloc as it comes. `--default-malloc` adds each of our rows
without the heap setting, and `--torch-keep-malloc` the PyTorch rows with it. JAX workers (HF
Flax's too) also lower Threefry's dropout bits unrolled, as the trainer does
(`xla_env.unroll_threefry`); `--rolled-threefry` adds our default step and, with `--hf-flax`,
HF Flax's with JAX's own loop (the "vs HF Flax" column stays against HF Flax with the unrolling).

On a GPU (JAX's default backend not the CPU) the same script measures the accelerator: the peak
is a jitted n=8192 matmul in the run's `--dtype` on the device (or `--peak-tflops`, a datasheet
figure), the memory column is each side's peak device memory (JAX's allocator statistics,
`torch.cuda.max_memory_allocated`), and `--torch-device cuda` runs the PyTorch side on the same
GPU, under `torch.autocast` in bf16 when `--dtype bfloat16` (fp32 weights, as ours).
`benchmarks/gpu_check.sh` is the whole device check (BERT-base, seq 128 and 512, bf16).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {  # layers, hidden, heads, intermediate
  "minilm": (6, 384, 12, 1536),
  "bert-base": (12, 768, 12, 3072),
}
REPO = Path(__file__).resolve().parents[1]


def flops_per_step(shape: str, batch: int, seq: int) -> float:
  L, h, _, inter = SHAPES[shape]
  n = L * (4 * h * h + 2 * h * inter)
  return 6 * n * batch * seq + 12 * L * seq * seq * h * batch


def bert_config(shape: str, **overrides):
  """Our BertConfig of a SHAPES entry (call after REPO is on sys.path)."""
  from research.models.bert import BertConfig

  L, h, heads, inter = SHAPES[shape]
  return BertConfig(num_hidden_layers=L, hidden_size=h, num_attention_heads=heads, intermediate_size=inter, **overrides)


def _peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux -> GB


def _time(step, warmup: int, steps: int) -> list[float]:
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
  return times


# Trace events that wrap ops rather than being one: the executable run, thread pools, Python.
_NOT_OPS = ("$", "ThunkExecutor", "PjitFunction", "SlinkyThreadPool", "CommonPjRtLoadedExecutable")


def _profile(step, steps: int = 2, top: int = 12) -> list[list]:
  """Runs `steps` more steps under jax.profiler and sums the compiled step's op time by kind
  (the HLO name without its number: `ynn_fusion` = YNNPACK dots with what XLA fused into them,
  `call` = rng_bit_generator, `wrapped_broadcast` = materialized broadcasts, ...). Returns
  [kind, ms per step, ops per step] for the `top` kinds and the total. Op time is summed over
  XLA's threads, so it can exceed the wall time."""
  import collections
  import glob
  import gzip
  import re
  import tempfile

  import jax

  out = tempfile.mkdtemp(prefix="train_step_profile_")
  with jax.profiler.trace(out):
    for _ in range(steps):
      step()
  trace = sorted(glob.glob(f"{out}/**/*.trace.json.gz", recursive=True))[-1]
  ms, n = collections.Counter(), collections.Counter()
  with gzip.open(trace) as f:
    events = json.load(f)["traceEvents"]
  for e in events:
    if e.get("ph") == "X" and not e["name"].startswith(_NOT_OPS):
      kind = re.sub(r"\.\d+$", "", e["name"])
      ms[kind] += e["dur"] / 1e3 / steps
      n[kind] += 1 / steps
  return _top_kinds(ms, n, top)


def _top_kinds(ms: dict, n: dict, top: int) -> list[list]:
  """[kind, ms per step, ops per step] for the `top` kinds by time, then the total."""
  rows = [[k, ms[k], round(n[k])] for k in sorted(ms, key=ms.get, reverse=True)[:top]]
  return rows + [["all ops", sum(ms.values()), round(sum(n.values()))]]


# --- workers (each runs in its own process) ------------------------------------------------


def worker_jax(
  shape: str,
  batch: int,
  seq: int,
  warmup: int,
  steps: int,
  dtype: str,
  rng_impl: str,
  remat: bool = False,
  attention: str = "",
  every_token: bool = False,
  optax_chain: bool = False,
  norms: bool = False,
  dropout_bits: str = "jax",
  profile: bool = False,
  sparse_embed: bool = True,
  matmul_dtype: str = "float32",
) -> dict:
  """`attention` set (einsum | xla | cudnn | auto): that kernel, without attention-probability
  dropout (the fused kernels have none), so the rows of one --fused comparison match."""
  sys.path.insert(0, str(REPO))
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from configs import glue
  from research import losses, optim, parallel
  from research import steps as steps_lib
  from research.models.bert import BertClassifier

  cfg = bert_config(shape, remat=remat, dropout_bits=dropout_bits, matmul_dtype=matmul_dtype)
  if attention:
    cfg = dataclasses.replace(cfg, attention=attention, attention_probs_dropout_prob=0.0)
  model = BertClassifier(cfg, num_labels=2, dtype=jnp.dtype(dtype), last_layer_cls_only=not every_token)
  rng = np.random.default_rng(0)
  data = {
    "input_ids": rng.integers(1000, 30000, size=(batch, seq)).astype(np.int32),
    "attention_mask": np.ones((batch, seq), np.int32),
    "token_type_ids": np.zeros((batch, seq), np.int32),
    "labels": rng.integers(0, 2, size=batch).astype(np.int32),
    "weights": np.ones(batch, np.float32),
  }
  params = model.init(
    jax.random.PRNGKey(0), data["input_ids"][:1], data["attention_mask"][:1], data["token_type_ids"][:1]
  )["params"]
  oc = glue.get_config().optimizer
  tx, schedule = optim.make_optimizer(oc, params, 1000)
  if optax_chain:  # the same AdamW as optax composes it: each stage a pass of its own
    adamw = optax.adamw(schedule, b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=oc.weight_decay)
    tx = optax.chain(optax.clip_by_global_norm(oc.clip_norm), optax.masked(adamw, optim.decay_mask(params)))
  mesh = parallel.make_mesh(1)
  rng = jax.random.key_data(jax.random.key(1, impl=rng_impl))
  state = parallel.replicate(steps_lib.create_state(params, tx, rng), mesh)
  fn = parallel.compile_train_step(
    functools.partial(
      steps_lib.train_step,
      model=model,
      loss_fn=losses.softmax_xent,
      tx=tx,
      schedule=schedule,
      rng_impl=rng_impl,
      norms=norms,  # off: the trainer's step on all but its logging steps
      sparse_embed=sparse_embed and not optax_chain,  # the embeddings' gradient as rows (as the trainer)
    ),
    mesh,
  )
  b = parallel.to_global(data, mesh)
  t0 = time.perf_counter()
  compiled = fn.lower(state, b).compile()
  compile_s = time.perf_counter() - t0
  temp_gb = compiled.memory_analysis().temp_size_in_bytes / 1e9
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  holder = {"state": state}

  def step():
    holder["state"], m = compiled(holder["state"], b)
    jax.block_until_ready(m["loss_sum"])

  times = _time(step, warmup, steps)
  return {
    "device_gb": _jax_device_peak_gb(),
    "profile": _profile(step) if profile else None,
    "profile_unit": "summed over XLA's threads",
    "framework": f"ours (jax {jax.__version__}, {dtype}, {rng_impl} dropout{', remat' if remat else ''}"
    + (", last layer over every token" if every_token else "")
    + (", optax AdamW chain" if optax_chain else "")
    + (", param/update norms" if norms else "")
    + ("" if sparse_embed or optax_chain else ", dense embedding gradient")
    + (f", {dropout_bits} dropout draws" if dropout_bits != "jax" else "")
    + (f", {matmul_dtype} matmuls" if matmul_dtype != "float32" else "")
    + (f", attention {attention}, no attention dropout)" if attention else ")"),
    "temp_gb": temp_gb,
    "times": times,
    "compile_s": compile_s,
    "xla_flops": float(cost.get("flops", 0.0)) if cost else 0.0,
    "rss_gb": _peak_rss_gb(),
  }


def _torch_profile(step, steps: int = 2, top: int = 12) -> list[list]:
  """`_profile` for the PyTorch row: torch.profiler's self CPU time per aten op (ms per step,
  timed on the calling thread, so an op's intra-op threads are not summed as XLA's are)."""
  from torch.profiler import ProfilerActivity, profile

  with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      step()
  ops = prof.key_averages()
  return _top_kinds(
    {e.key: e.self_cpu_time_total / 1e3 / steps for e in ops}, {e.key: e.count / steps for e in ops}, top
  )


def torch_train_step(model, opt, autocast, sync=None, **inputs):
  """The PyTorch reference's step as a closure: forward under `autocast`, backward, clip the
  gradient norm to 1, AdamW; `sync` after it (the GPU). The step returns the loss."""
  import torch

  def step():
    with autocast:
      loss = model(**inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if sync:
      sync()
    return loss

  return step


def worker_torch(
  shape: str,
  batch: int,
  seq: int,
  warmup: int,
  steps: int,
  profile: bool = False,
  device: str = "cpu",
  dtype: str = "float32",
) -> dict:
  """Under `torch.autocast` in `dtype` unless float32 (on the CPU: oneDNN's bf16 kernels, AMX
  where the CPU has it); `device` cuda: the same step on the GPU."""
  import contextlib

  import torch
  import transformers

  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  cuda = device == "cuda"
  autocast = torch.autocast(device, dtype=getattr(torch, dtype)) if dtype != "float32" else contextlib.nullcontext()
  L, h, heads, inter = SHAPES[shape]
  cfg = transformers.BertConfig(
    num_hidden_layers=L, hidden_size=h, num_attention_heads=heads, intermediate_size=inter, num_labels=2
  )
  model = transformers.BertForSequenceClassification(cfg).train().to(device)
  opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
  ids = torch.randint(1000, 30000, (batch, seq), device=device)
  mask = torch.ones(batch, seq, dtype=torch.long, device=device)
  labels = torch.randint(0, 2, (batch,), device=device)

  step = torch_train_step(
    model, opt, autocast, torch.cuda.synchronize if cuda else None, input_ids=ids, attention_mask=mask, labels=labels
  )

  times = _time(step, warmup, steps)
  where = (f", {torch.cuda.get_device_name()}" if cuda else "") + (f", {dtype} autocast" if dtype != "float32" else "")
  return {
    "framework": f"transformers {transformers.__version__} PyTorch eager (torch {torch.__version__}{where})",
    "device_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
    "times": times,
    "profile": _torch_profile(step) if profile else None,
    "profile_unit": "self CPU time per aten op, on the calling thread",
    "rss_gb": _peak_rss_gb(),
  }


def worker_hf_flax(
  shape: str, batch: int, seq: int, warmup: int, steps: int, dtype: str = "float32", profile: bool = False
) -> dict:
  """Hugging Face's Flax BERT (transformers 4.x, the last with Flax classes) under jax.jit, as
  its `run_flax_glue.py` trains it: `model.__call__` with `dropout_rng`, optax AdamW (plus
  clipping at 1.0, as the PyTorch side), donated state, on the same jax/XLA as ours. `dtype`
  bfloat16: its own mixed precision (`dtype=` of the model: bf16 computation, fp32 params)."""
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import transformers

  L, h, heads, inter = SHAPES[shape]
  cfg = transformers.BertConfig(
    num_hidden_layers=L, hidden_size=h, num_attention_heads=heads, intermediate_size=inter, num_labels=2
  )
  model = transformers.FlaxBertForSequenceClassification(cfg, seed=0, dtype=jnp.dtype(dtype))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(5e-5, weight_decay=0.01))
  rng = np.random.default_rng(0)
  ids = rng.integers(1000, 30000, (batch, seq)).astype(np.int32)
  mask = np.ones((batch, seq), np.int32)
  labels = rng.integers(0, 2, (batch,)).astype(np.int32)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def train_step(state, dropout_rng):
    params, opt_state = state

    def loss_fn(p):
      logits = model(ids, mask, params=p, dropout_rng=dropout_rng, train=True).logits
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  state = [(model.params, tx.init(model.params))]
  keys = iter(jax.random.split(jax.random.key(0), warmup + steps + 2))  # + the 2 profiled steps

  def step():
    state[0], loss = train_step(state[0], next(keys))
    loss.block_until_ready()

  times = _time(step, warmup, steps)
  return {
    "framework": f"transformers {transformers.__version__} Flax (jax {jax.__version__}, jitted"
    + (f", {dtype} compute)" if dtype != "float32" else ")"),
    "times": times,
    "rss_gb": _peak_rss_gb(),
    "device_gb": _jax_device_peak_gb(),
    "profile": _profile(step) if profile else None,
    "profile_unit": "summed over XLA's threads",
  }


def _jax_device_peak_gb() -> float | None:
  """Peak memory of this process's first JAX device (GPU/TPU); None on the CPU, which keeps no stats."""
  import jax

  stats = jax.local_devices()[0].memory_stats() or {}
  return stats["peak_bytes_in_use"] / 1e9 if "peak_bytes_in_use" in stats else None


def worker_peak(dtype: str) -> dict:
  """The matmul peak of JAX's default device: numpy's fp32 peak on the CPU (the best BLAS path
  here), else a jitted n=8192 matmul in `dtype` on the accelerator (median of 10 after a warm-up)."""
  import jax
  import jax.numpy as jnp

  dev = jax.devices()[0]
  if dev.platform == "cpu":
    return {"platform": "cpu", "what": "fp32 matmul peak (numpy, n=4096)", "gflops": matmul_peak()}
  n = 8192
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
  mm = jax.jit(lambda x: x @ x)
  times = _time(lambda: mm(a).block_until_ready(), warmup=1, steps=10)
  what = f"{dtype} matmul peak ({dev.device_kind}, jax {jax.__version__}, n={n})"
  return {"platform": dev.platform, "what": what, "gflops": 2 * n**3 / statistics.median(times) / 1e9}


def matmul_peak(n: int = 4096, reps: int = 5) -> float:
  import numpy as np

  a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
  times = _time(lambda: a @ a, warmup=1, steps=reps)
  return 2 * n**3 / statistics.median(times) / 1e9


# --- orchestration ---------------------------------------------------------------------------


def _side_venv(name: str, base_python: str, packages: list[str], what: str) -> str:
  """~/.cache/research/<name>: a venv made from `base_python` with `packages`, once."""
  venv = Path.home() / ".cache" / "research" / name
  py = venv / "bin" / "python"
  if not py.exists():
    print(f"creating the {what} reference venv at {venv}", file=sys.stderr)
    subprocess.run([base_python, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", *packages], check=True)
  return str(py)


def ensure_torch_python(path: str | None) -> str:
  packages = ["torch==2.13.0", "transformers==5.23.*", "safetensors", "accelerate>=1.1"]
  return path or _side_venv("torchref", "python3.11", packages, "PyTorch (Python 3.11, torch 2.13 CPU)")


def ensure_hf_flax_python(path: str | None) -> str:
  """A venv with our jax/jaxlib/flax/optax versions and transformers 4.57 (the last release
  with Flax models), so that HF's Flax BERT runs on the same JAX as ours."""
  from importlib.metadata import version

  pins = [f"{p}=={version(p)}" for p in ("jax", "jaxlib", "flax", "optax")]
  return path or _side_venv("hfflax", sys.executable, [*pins, "transformers==4.57.6"], "HF Flax (transformers 4.57.6)")


def run_worker(
  python: str,
  kind: str,
  args,
  shape: str,
  dtype: str = "float32",
  remat: bool = False,
  attention: str = "",
  every_token: bool = False,
  optax_chain: bool = False,
  norms: bool = False,
  dropout_bits: str = "jax",
  sparse_embed: bool = True,
  matmul_dtype: str = "float32",
  malloc: str = "keep",
  threefry: str = "unrolled",
) -> dict:
  """One row in a process of its own. `malloc`: "keep" for the trainer's heap setting
  (research.xla_env.keep_host_memory), "default" for glibc's malloc as it comes. `threefry`:
  "unrolled" as the trainer lowers it for the CPU (research.xla_env.unroll_threefry), "rolled"
  as JAX does."""
  cmd = (
    [
      python,
      __file__,
      "--worker",
      kind,
      "--shapes",
      shape,
      "--batch",
      str(args.batch),
      "--seq",
      str(args.seq),
      "--warmup",
      str(args.warmup),
      "--steps",
      str(args.steps),
      "--dtype",
      dtype,
      "--rng-impl",
      args.rng_impl,
    ]
    + (["--remat"] if remat else [])
    + (["--attention", attention] if attention else [])
    + (["--every-token"] if every_token else [])
    + (["--optax-chain"] if optax_chain else [])
    + (["--norms"] if norms else [])
    + ["--dropout-bits", dropout_bits]
    + ([] if sparse_embed else ["--dense-embed"])
    + ["--matmul-dtype", matmul_dtype]
    + (["--profile"] if args.profile else [])
    + ["--torch-device", args.torch_device]
  )
  env = dict(os.environ, RESEARCH_HOST_MALLOC=malloc, RESEARCH_THREEFRY=threefry)
  out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
  if out.returncode:
    raise RuntimeError(f"{kind} worker failed:\n{out.stderr[-4000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def _our_rows(args) -> list[dict]:
  """Our rows, as run_worker's keyword arguments: the default step, then one per lever asked for."""
  ours = [{}]
  ours += [{"remat": True}] if args.remat else []
  ours += [{"every_token": True}] if args.every_token else []
  ours += [{"optax_chain": True}, {"norms": True}] if args.optimizer_levers else []
  ours += [{"sparse_embed": False}] if args.dense_embed_grad else []
  ours += [{"dropout_bits": "hash"}] if args.hash_dropout else []
  ours += [{"matmul_dtype": "bfloat16"}] if args.bf16_matmul else []
  ours += [{"matmul_dtype": "bfloat16", "dropout_bits": "hash"}] if args.bf16_matmul and args.hash_dropout else []
  ours += [{"attention": a} for a in ("einsum", args.fused)] if args.fused else []
  ours += [{"threefry": "rolled"}] if args.rolled_threefry else []
  return ours + ([dict(kw, malloc="default") for kw in ours] if args.default_malloc else [])


def _print_bf16_pair(results: list[dict]) -> None:
  """Ours with bf16 matmul operands against PyTorch under bf16 autocast and HF Flax in bf16, when they ran."""
  mine = [r for r in results if "bfloat16 matmuls" in r["framework"]]
  for tag, name in (("bfloat16 autocast", "PyTorch autocast"), ("bfloat16 compute", "HF Flax bf16")):
    theirs = [r for r in results if tag in r["framework"]]
    if mine and theirs:
      ratio = statistics.median(theirs[0]["times"]) / statistics.median(mine[0]["times"])
      print(f"  (bf16 against bf16: ours / {name} = {ratio:.2f}x)")


def _run_as_worker(args) -> dict:
  """This process is one row's worker: the heap setting first (before any JAX or PyTorch thread
  exists), then the measurement; a row whose heap differs from its side's default says so."""
  shape = args.shapes[0]
  sys.path.insert(0, str(REPO))
  from research import xla_env

  keep = xla_env.keep_host_memory if args.worker == "torch" else xla_env.keep_step_buffers  # as the trainer
  kept = args.worker != "peak" and args.torch_device == "cpu" and keep()
  unrolled = args.worker in ("jax", "hf_flax") and xla_env.unroll_threefry()  # as the trainer, HF Flax too
  if args.worker == "peak":
    return worker_peak(args.dtype)
  if args.worker == "hf_flax":
    r = worker_hf_flax(shape, args.batch, args.seq, args.warmup, args.steps, args.dtype, args.profile)
  elif args.worker == "torch":
    r = worker_torch(shape, args.batch, args.seq, args.warmup, args.steps, args.profile, args.torch_device, args.dtype)
  else:
    r = worker_jax(
      shape,
      args.batch,
      args.seq,
      args.warmup,
      args.steps,
      args.dtype,
      args.rng_impl,
      args.remat,
      args.attention,
      args.every_token,
      args.optax_chain,
      args.norms,
      args.dropout_bits,
      args.profile,
      not args.dense_embed,
      args.matmul_dtype,
    )
  if kept != (args.worker in ("jax", "hf_flax")):
    r["framework"] = r["framework"][:-1] + (", malloc heap kept)" if kept else ", glibc default malloc)")
  if unrolled != (args.worker in ("jax", "hf_flax")):
    r["framework"] = r["framework"][:-1] + ", JAX's rolled Threefry)"
  return r


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shapes", nargs="+", default=["minilm"], choices=sorted(SHAPES))
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--dtype", default="float32", help="our compute dtype (params stay fp32)")
  p.add_argument("--rng-impl", default="threefry2x32", help="our dropout bits: threefry2x32 | rbg")
  p.add_argument("--torch-python", default=None, help="python with torch + transformers (else a venv is made)")
  p.add_argument("--skip-torch", action="store_true")
  p.add_argument(
    "--torch-device", default="cpu", choices=["cpu", "cuda"], help="where the PyTorch side runs (cuda: on the GPU)"
  )
  p.add_argument(
    "--peak-tflops", type=float, help="use this peak (e.g. the GPU's datasheet bf16 figure) instead of measuring it"
  )
  p.add_argument(
    "--hf-flax", action="store_true", help="also time Hugging Face's Flax BERT (transformers 4.57) on our JAX"
  )
  p.add_argument("--hf-flax-python", default=None, help="python with jax + transformers 4.57 (else a venv is made)")
  p.add_argument("--remat", action="store_true", help="also time our step with layer rematerialization")
  p.add_argument(
    "--fused",
    choices=["xla", "cudnn", "auto"],
    help="also time our step with jax.nn.dot_product_attention (this implementation) beside the einsum "
    "attention, both without attention-probability dropout",
  )
  p.add_argument(
    "--every-token", action="store_true", help="also time our step with the last layer over every token (as HF)"
  )
  p.add_argument(
    "--optimizer-levers",
    action="store_true",
    help="also time our step with optax's AdamW chain instead of the fused one, and with the norms on",
  )
  p.add_argument(
    "--hash-dropout",
    action="store_true",
    help="also time our step with dropout draws from a keyed index hash (config.model.dropout_bits=hash);"
    " with --bf16-matmul, a row with both",
  )
  p.add_argument(
    "--rounds",
    type=int,
    default=1,
    help="run our rows this many times, interleaved, each in a fresh process; the medians pool every round's "
    "steps (for A/B tests on a host whose speed drifts)",
  )
  p.add_argument(
    "--dense-embed-grad",
    action="store_true",
    help="also time our step with the word embeddings' gradient dense (optimizer.sparse_embed_grad=False)",
  )
  p.add_argument(
    "--bf16-matmul",
    action="store_true",
    help="also time our step with bf16 matmul operands and fp32 results (config.model.matmul_dtype=bfloat16)",
  )
  p.add_argument(
    "--torch-bf16",
    action="store_true",
    help="also time PyTorch under torch.autocast(bfloat16) (on the CPU: oneDNN bf16 kernels, AMX where present)",
  )
  p.add_argument(
    "--profile",
    action="store_true",
    help="after timing, profile 2 steps of each row (ours and HF Flax: jax.profiler; PyTorch: torch.profiler)",
  )
  p.add_argument(
    "--default-malloc",
    action="store_true",
    help="also time each of our rows with glibc's malloc as it comes, without the trainer's heap setting "
    "(research.xla_env: no mmap, no trimming, steps run on the calling thread)",
  )
  p.add_argument(
    "--rolled-threefry",
    action="store_true",
    help="also time our step with JAX's own CPU lowering of Threefry (a loop; the trainer unrolls it: "
    "research.xla_env.unroll_threefry)",
  )
  p.add_argument(
    "--torch-keep-malloc",
    action="store_true",
    help="also time each PyTorch row with that heap setting (the reference rows run with glibc's default)",
  )
  p.add_argument("--dropout-bits", default="jax", help=argparse.SUPPRESS)
  p.add_argument("--optax-chain", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--norms", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--dense-embed", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--matmul-dtype", default="float32", help=argparse.SUPPRESS)
  p.add_argument("--attention", default="", help=argparse.SUPPRESS)
  p.add_argument("--worker", choices=["jax", "torch", "hf_flax", "peak"], help=argparse.SUPPRESS)
  args = p.parse_args()

  if args.worker:
    print(json.dumps(_run_as_worker(args)))
    return

  sys.path.insert(0, str(REPO))
  from research import xla_env

  xla_env.set_cpu_flags()  # the trainer's XLA:CPU flags, for every JAX worker (ours and HF Flax)
  measured = run_worker(sys.executable, "peak", args, args.shapes[0], args.dtype)  # in a process of its own
  peak = 1e3 * args.peak_tflops if args.peak_tflops else measured["gflops"]
  torch_py = None if args.skip_torch else ensure_torch_python(args.torch_python)
  flax_py = ensure_hf_flax_python(args.hf_flax_python) if args.hf_flax or args.hf_flax_python else None
  on_cpu = measured["platform"] == "cpu"
  print(
    f"{measured['what']}: {measured['gflops']:.0f} GFLOP/s"
    + (f" (% of peak below uses the given {peak:.0f})" if args.peak_tflops else "")
    + f"; batch {args.batch}, seq {args.seq}; median of {args.steps} steps after {args.warmup} warm-ups"
  )
  options = (
    ("PyTorch", torch_py),
    ("no remat", args.remat),
    ("every token", args.every_token),
    ("einsum", args.fused),
    ("our default step", args.optimizer_levers or args.hash_dropout or args.dense_embed_grad),
  )
  reference = next((name for name, on in options if on), None)
  header = (
    f"| shape | framework | s/step | ex/s | GFLOP/s | % of peak | {'peak RSS GB' if on_cpu else 'peak device GB'} "
    f"| XLA temp GB | {f'speed vs {reference}' if reference else 'speed'} |"
  )
  header += " speed vs HF Flax |" if flax_py else ""
  print(header + "\n|" + "---|" * (10 if flax_py else 9))
  rows = _Rows(args)
  for shape in args.shapes:
    flops = flops_per_step(shape, args.batch, args.seq)
    results, flax_rows, ref, flax_ref = _measure_shape(args, shape, rows, torch_py, flax_py, reference)
    every_row = results + flax_rows
    for r in every_row:
      med = statistics.median(r["times"])
      ratio = f"{ref / med:.2f}x" if ref else "-"
      temp = f"{r['temp_gb']:.2f}" if "temp_gb" in r else "-"
      mem = r["rss_gb"] if on_cpu else r.get("device_gb")
      print(
        f"| {shape} | {r['framework']} | {med:.3f} | {args.batch / med:.2f} | {flops / med / 1e9:.0f} | "
        f"{100 * flops / med / 1e9 / peak:.0f}% | {'-' if mem is None else f'{mem:.1f}'} | {temp} | {ratio} |"
        + (f" {flax_ref / med:.2f}x |" if flax_ref else "")
      )
    _print_bf16_pair(every_row)
    for r in results:
      if r.get("xla_flops"):
        print(
          f"  ({shape}, {r['framework']}: formula {flops / 1e9:.0f} GFLOP/step, XLA cost analysis "
          f"{r['xla_flops'] / 1e9:.0f}; compile {r['compile_s']:.1f} s)"
        )
    for r in every_row:
      if r.get("profile"):  # the last round's
        print(f"\nop time by kind, {shape}, {r['framework']} (ms per step, {r['profile_unit']}; ops per step):")
        print("  " + "; ".join(f"{kind} {ms:.0f} ({n})" for kind, ms, n in r["profile"]))
  for row, why in rows.failed:
    print(f"  (failed, not in the table: {row}: {why})")
  if rows.failed:
    sys.exit(1)


class _Rows:
  """Runs rows (run_worker); a row that fails (a GPU kernel this device lacks, its memory) is
  noted and gives None, and the other rows go on: a lent GPU's minutes are not lost to one row."""

  def __init__(self, args):
    self.args, self.failed = args, []  # failed: (row, why)

  def run(self, python, kind, shape, *a, **kw) -> dict | None:
    try:
      return run_worker(python, kind, self.args, shape, *a, **kw)
    except RuntimeError as e:
      lines = [line.strip() for line in str(e).splitlines() if line.strip()]
      why = next((s for s in reversed(lines) if re.match(r"[\w.]+(Error|Exception)\b", s)), lines[-1])
      self.failed.append((f"{shape} {kind} {a} {kw}", why))
      print(f"  ({shape}: the {kind} row {a} {kw} failed: {why})", file=sys.stderr, flush=True)
      return None


def _our_results(args, shape: str, rows: _Rows) -> list[dict | None]:
  """Our rows, interleaved over --rounds (a drift in the host's speed hits every row alike)."""
  results = []
  for round_ in range(args.rounds):
    for i, kw in enumerate(_our_rows(args)):
      if round_ and results[i] is None:
        continue
      r = rows.run(sys.executable, "jax", shape, args.dtype, **kw)
      if not round_:
        results.append(r)
      elif r is not None:
        results[i]["times"] += r["times"]
  return results


def _measure_shape(args, shape: str, rows: _Rows, torch_py, flax_py, reference):
  """One shape's rows: ours, PyTorch's and HF Flax's (its fp32 row first); with the reference
  row's and HF Flax's fp32 median step times (None where absent or failed)."""
  results = _our_results(args, shape, rows)
  flax_fp32 = rows.run(flax_py, "hf_flax", shape) if flax_py else None
  # with --bf16-matmul HF Flax's own mixed precision too; with --rolled-threefry HF Flax as it comes
  flax_rows = [
    flax_fp32,
    rows.run(flax_py, "hf_flax", shape, "bfloat16") if flax_py and args.bf16_matmul else None,
    rows.run(flax_py, "hf_flax", shape, threefry="rolled") if flax_py and args.rolled_threefry else None,
  ]
  if torch_py:  # autocast unless float32; glibc's malloc as PyTorch users run it
    results.append(rows.run(torch_py, "torch", shape, args.dtype, malloc="default"))
  if torch_py or reference == "einsum":
    ref_row = results[-1] if torch_py else results[-2]
  else:
    ref_row = results[1] if reference == "every token" else results[0]
  torch_dtypes = ["bfloat16"] if torch_py and args.torch_bf16 else []  # PyTorch's mixed precision, after the reference
  for dtype in torch_dtypes:
    results.append(rows.run(torch_py, "torch", shape, dtype, malloc="default"))
  for dtype in [args.dtype, *torch_dtypes] if torch_py and args.torch_keep_malloc else []:
    results.append(rows.run(torch_py, "torch", shape, dtype, malloc="keep"))
  median = lambda row: statistics.median(row["times"]) if row else None  # noqa: E731
  return (
    [r for r in results if r],
    [r for r in flax_rows if r],
    median(ref_row) if reference else None,
    median(flax_fp32),
  )


if __name__ == "__main__":
  main()
