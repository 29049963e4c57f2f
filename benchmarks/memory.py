"""Per-device training memory from the model and the mesh: which sizes fit where, data vs fsdp.

    python benchmarks/memory.py [--seq 512] [--per-device-batch 8] [--devices 8]

Parameter counts come from `jax.eval_shape` of our models (no compilation). Per device, fp32
weights and AdamW, no rematerialization:

    state        = 16 bytes per parameter (weights 4, gradients 4, two Adam moments 8);
                   divided by k under fsdp=k (ZeRO-3: all four are sharded)
    activations  = per layer and example, kept for the backward pass (Korthikanti et al. 2022,
                   "Reducing Activation Recomputation", eq. 1, with fp32 tensors and 1-byte
                   dropout masks): s*h*66 + 9*a*s^2 bytes, for s tokens, width h, a heads
    fsdp peak    = + one layer's gathered weights and gradients (8 bytes x layer parameters)
    with remat   = activations: each layer's fp32 input (s*h*4 bytes per example) plus one
                   layer's full activations, recomputed during the backward pass
                   (config.model.remat; measured on MiniLM by benchmarks/train_step.py --remat)

`data` replicates the state on every device. It is arithmetic, not a measurement: allocator
slack and XLA workspace add some percent, so a total within 15% of the limit is marked "tight".
"remat" marks a size that fits only with rematerialization.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from research.models.bert import BertClassifier, BertConfig
from research.models.gpt import GPT, GPTConfig

# name -> (kind, layers, width, heads)
MODELS = {
  "MiniLM-L6 (23M)": ("bert", 6, 384, 12),
  "BERT-base (110M)": ("bert", 12, 768, 12),
  "BERT-large (335M)": ("bert", 24, 1024, 16),
  "GPT-2 XL (1.5B)": ("gpt", 48, 1600, 25),
  "7B decoder": ("gpt", 32, 4096, 32),
}
HARDWARE = {"16 GB (V100, TPU v5e)": 16, "32 GB (TPU v4)": 32, "40 GB (A100)": 40, "80 GB (A100, H100)": 80}


def count(kind: str, layers: int, width: int, heads: int, seq: int) -> int:
  ids = jnp.zeros((1, 8), jnp.int32)
  if kind == "bert":
    cfg = BertConfig(
      hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * width
    )
    shapes = jax.eval_shape(lambda: BertClassifier(cfg, 2).init(jax.random.key(0), ids, ids, ids))
  else:
    cfg = GPTConfig(vocab_size=50304, block_size=max(seq, 8), num_layers=layers, num_heads=heads, hidden_size=width)
    shapes = jax.eval_shape(lambda: GPT(cfg).init(jax.random.key(0), ids))
  return int(sum(x.size for x in jax.tree.leaves(shapes)))


def fits(total: float, total_remat: float, cap: float) -> str:
  if total <= 0.85 * cap:
    return "yes"
  if total <= cap:
    return "tight"
  return "remat" if total_remat <= 0.85 * cap else "no"


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--per-device-batch", type=int, default=8)
  ap.add_argument("--devices", type=int, default=8)
  args = ap.parse_args()
  s, b, k, gb = args.seq, args.per_device_batch, args.devices, 2**30
  print(f"Per device: seq {s}, {b} sequences per device, {k} devices; fp32 weights + AdamW.\n")
  print("| model | params | mesh | state | activations | total | total, remat | " + " | ".join(HARDWARE) + " |")
  print("|---|---|---|---|---|---|---|" + "---|" * len(HARDWARE))
  for name, (kind, layers, width, heads) in MODELS.items():
    n = count(kind, layers, width, heads, s)
    act_layer = b * (s * width * 66 + 9 * heads * s * s)
    act, act_remat = layers * act_layer, layers * b * s * width * 4 + act_layer
    layer_params = n / layers
    for mesh, shards in (("data", 1), (f"fsdp={k}", k)):
      state = 16 * n / shards + (8 * layer_params if shards > 1 else 0)
      total, total_remat = state + act, state + act_remat

      print(
        f"| {name} | {n / 1e6:,.0f}M | {mesh} | {state / gb:.1f} GB | {act / gb:.1f} GB | {total / gb:.1f} GB | "
        f"{total_remat / gb:.1f} GB | "
        + " | ".join(fits(total, total_remat, cap * gb) for cap in HARDWARE.values())
        + " |"
      )


if __name__ == "__main__":
  main()
