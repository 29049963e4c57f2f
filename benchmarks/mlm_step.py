"""Masked-LM pretraining step: ours beside transformers' PyTorch BertForMaskedLM, in one run.

    .venv/bin/python benchmarks/mlm_step.py --torch-python ~/.cache/research/torchref/bin/python
    .venv/bin/python benchmarks/mlm_step.py --every-token --bf16-matmul --torch-bf16 --rounds 2

Both sides train a masked LM of the MiniLM shape (6 x 384, 12 heads, vocabulary 30,522, decoder
tied to the word embeddings) with AdamW and dropout on, on one batch of B x L random word ids
masked as BERT does (`research.data.lm.MaskedLM` with the MiniLM tokenizer: 15% of the tokens,
80% [MASK] / 10% random / 10% kept, at most P = ceil(1.5 x 15% x L) + 4 a row), the same masks
on both sides. PyTorch's `BertForMaskedLM` computes the decoder at every position with the
labels -100 elsewhere, as `run_mlm.py` and its data collator train it. Ours is the trainer's
step (`configs/pretrain_mlm.py`'s optimizer, the step between logging steps): the decoder runs
on the P gathered positions a row only, and the last layer too
(`model.last_layer_masked_only`, the default); `--every-token` adds a row with the last layer
over every token, `--bf16-matmul` one with bf16 matmul operands (`model.matmul_dtype`),
`--exact-count` one like the last of ours on a batch masked with exactly 15% of each row's
tokens (`data.mask_count=exact`, BERT's own data generator: P = 20 slots a row at L = 128
instead of 33), `--torch-bf16` PyTorch under CPU autocast in bf16. `--rounds N` repeats our rows interleaved,
so that a drift in the host's speed hits them alike. Each side runs in a process of its own
(peak RSS is its own); PyTorch from the side venv of `benchmarks/train_step.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step as ts  # noqa: E402  (the timing, RSS and side-venv helpers)

REPO = ts.REPO


def make_batch(batch: int, seq: int, path: str, count: str = "bernoulli") -> dict:
  """One masked batch (numpy arrays), saved to `path` for the workers; what it holds."""
  sys.path.insert(0, str(REPO))
  import numpy as np
  import transformers

  from research.data.lm import MaskedLM
  from research.models.convert import resolve_pretrained

  tok = transformers.AutoTokenizer.from_pretrained(str(resolve_pretrained("minilm")))
  ids = np.random.default_rng(0).integers(1000, 30000, size=(batch, seq)).astype(np.int32)
  b = MaskedLM(tok, count=count)(ids, np.ones_like(ids, bool), (0,))
  np.savez(path, **b)
  return {"P": b["masked_positions"].shape[1], "masked": float(b["weights"].sum()), "vocab": len(tok)}


def worker_jax(path: str, warmup: int, steps: int, matmul_dtype: str, every_token: bool, dropout_bits: str) -> dict:
  """Our trainer's step on the batch at `path`."""
  sys.path.insert(0, str(REPO))
  import functools

  import jax
  import numpy as np

  from configs import pretrain_mlm
  from research import losses, optim, parallel
  from research import steps as steps_lib
  from research.models.bert import BertForMaskedLM

  cfg = ts.bert_config("minilm", dropout_bits=dropout_bits, matmul_dtype=matmul_dtype)
  model = BertForMaskedLM(cfg, last_layer_masked_only=not every_token)
  data = dict(np.load(path))
  first = {k: data[k][:1] for k in ("input_ids", "attention_mask", "token_type_ids")}
  params = model.init(jax.random.PRNGKey(0), *first.values())["params"]
  tx, schedule = optim.make_optimizer(pretrain_mlm.get_config().optimizer, params, 1000)
  mesh = parallel.make_mesh(1)
  state = parallel.replicate(
    steps_lib.create_state(params, tx, jax.random.key_data(jax.random.key(1, impl="rbg"))), mesh
  )
  step_fn = functools.partial(
    steps_lib.train_step,
    model=model,
    loss_fn=losses.softmax_xent,
    tx=tx,
    schedule=schedule,
    rng_impl="rbg",
    norms=False,
  )
  b = parallel.to_global(data, mesh)
  compiled = parallel.compile_train_step(step_fn, mesh).lower(state, b).compile()
  holder = {"state": state}

  def step():
    holder["state"], m = compiled(holder["state"], b)
    holder["loss"] = float(m["loss_sum"] / m["count"])

  times = ts._time(step, warmup, steps)
  return {
    "framework": f"ours (jax {jax.__version__}, rbg dropout"
    + (f", {dropout_bits} draws" if dropout_bits != "jax" else "")
    + (", last layer over every token" if every_token else ", last layer at the masked positions")
    + (f", {data['masked_positions'].shape[1]} slots a row")
    + (f", {matmul_dtype} matmuls)" if matmul_dtype != "float32" else ")"),
    "times": times,
    "loss": holder["loss"],
    "rss_gb": ts._peak_rss_gb(),
  }


def worker_torch(path: str, warmup: int, steps: int, dtype: str) -> dict:
  import contextlib

  import numpy as np
  import torch
  import transformers

  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  data = np.load(path)
  L, h, heads, inter = ts.SHAPES["minilm"]
  cfg = transformers.BertConfig(num_hidden_layers=L, hidden_size=h, num_attention_heads=heads, intermediate_size=inter)
  model = transformers.BertForMaskedLM(cfg).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=0.01)
  ids = torch.from_numpy(data["input_ids"].astype(np.int64))
  labels = torch.full_like(ids, -100)  # the decoder at every position, the loss at the masked ones
  rows, slots = np.nonzero(data["weights"])
  labels[rows, data["masked_positions"][rows, slots]] = torch.from_numpy(data["labels"][rows, slots].astype(np.int64))
  mask = torch.ones_like(ids)
  autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()
  holder = {}
  torch_step = ts.torch_train_step(model, opt, autocast, input_ids=ids, attention_mask=mask, labels=labels)

  def step():
    holder["loss"] = float(torch_step())

  times = ts._time(step, warmup, steps)
  return {
    "framework": f"transformers {transformers.__version__} BertForMaskedLM, PyTorch eager (torch {torch.__version__}"
    + (", bf16 autocast)" if dtype == "bfloat16" else ")"),
    "times": times,
    "loss": holder["loss"],
    "rss_gb": ts._peak_rss_gb(),
  }


def run(python: str, args, path: str, *extra: str) -> dict:
  """One worker process on the batch file `path`; its result."""
  cmd = [python, __file__, "--worker", path, "--warmup", str(args.warmup), "--steps", str(args.steps), *extra]
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if out.returncode:
    raise RuntimeError(f"worker {' '.join(extra)} failed:\n{out.stderr[-4000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--steps", type=int, default=6)
  p.add_argument("--rounds", type=int, default=1, help="repeat our rows, interleaved")
  p.add_argument("--every-token", action="store_true", help="+ our last layer over every token")
  p.add_argument("--bf16-matmul", action="store_true", help="+ ours with bf16 matmul operands")
  p.add_argument("--hash-dropout", action="store_true", help="our rows with index-hash dropout draws")
  p.add_argument("--exact-count", action="store_true", help="+ the last of ours on an exact-count masked batch")
  p.add_argument("--torch-bf16", action="store_true", help="+ PyTorch under CPU autocast (bf16)")
  p.add_argument("--torch-python", default=None, help="python with torch + transformers (else a venv is made)")
  p.add_argument("--skip-torch", action="store_true")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # the batch file
  p.add_argument("--side", default="jax", help=argparse.SUPPRESS)
  p.add_argument("--matmul-dtype", default="float32", help=argparse.SUPPRESS)
  p.add_argument("--dropout-bits", default="jax", help=argparse.SUPPRESS)
  args = p.parse_args()

  if args.worker:
    if args.side == "torch":  # glibc's malloc as PyTorch users run it
      r = worker_torch(args.worker, args.warmup, args.steps, args.matmul_dtype)
    else:
      sys.path.insert(0, str(REPO))
      from research import xla_env

      xla_env.prepare_process()  # the trainer's process settings (heap, Threefry), before JAX starts
      r = worker_jax(args.worker, args.warmup, args.steps, args.matmul_dtype, args.every_token, args.dropout_bits)
    print(json.dumps(r))
    return

  sys.path.insert(0, str(REPO))
  from research import xla_env

  xla_env.set_cpu_flags()  # the trainer's XLA:CPU flags
  torch_py = None if args.skip_torch else ts.ensure_torch_python(args.torch_python)
  with tempfile.TemporaryDirectory() as tmp:
    path = f"{tmp}/batch.npz"
    info = make_batch(args.batch, args.seq, path)
    bits = "hash" if args.hash_dropout else "jax"
    ours = [(path, "--dropout-bits", bits)]
    ours += [(path, "--dropout-bits", bits, "--every-token")] if args.every_token else []
    ours += [(path, "--dropout-bits", bits, "--matmul-dtype", "bfloat16")] if args.bf16_matmul else []
    if args.exact_count:
      exact = make_batch(args.batch, args.seq, f"{tmp}/exact.npz", "exact")
      ours.append((f"{tmp}/exact.npz", *ours[-1][1:]))
    results = []
    for round_ in range(args.rounds):
      for i, (batch_file, *extra) in enumerate(ours):
        r = run(sys.executable, args, batch_file, *extra)
        if round_:
          results[i]["times"] += r["times"]
        else:
          results.append(r)
    if torch_py:
      results.append(run(torch_py, args, path, "--side", "torch"))
      if args.torch_bf16:
        results.append(run(torch_py, args, path, "--side", "torch", "--matmul-dtype", "bfloat16"))
  print(
    f"MiniLM masked LM, batch {args.batch} x {args.seq}, {info['masked']:.0f} masked tokens in {args.batch} x "
    f"{info['P']} prediction slots, vocabulary {info['vocab']}; median of {args.steps * args.rounds} steps"
    + (f"; exact-count batch: {exact['masked']:.0f} masked in {exact['P']} slots a row" if args.exact_count else "")
  )
  ref = statistics.median(results[len(ours)]["times"]) if torch_py else statistics.median(results[0]["times"])
  print(
    f"| framework | s/step | tokens/s | peak RSS GB | loss (last step) | speed vs {'PyTorch' if torch_py else 'ours'} |"
  )
  print("|---|---|---|---|---|---|")
  for r in results:
    med = statistics.median(r["times"])
    print(
      f"| {r['framework']} | {med:.3f} | {args.batch * args.seq / med:,.0f} | {r['rss_gb']:.1f} | {r['loss']:.3f} "
      f"| {ref / med:.2f}x |"
    )


if __name__ == "__main__":
  main()
