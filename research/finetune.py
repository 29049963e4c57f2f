"""Fine-tuning strategies: which parameters train, and LoRA merging. Pure functions of trees.

    config.finetune.strategy = "full" | "frozen" | "top_k" | "bitfit" | "lora"

- full: every parameter.
- frozen: the encoder is frozen; only the task head (`classifier`) trains.
- top_k: the top `finetune.top_k` encoder layers, the pooler and the head.
- bitfit (Ben Zaken et al. 2022): every bias (LayerNorm biases included) and the head.
- lora (Hu et al. 2021): rank-`lora_rank` adapters on `lora_targets` (see `LoraDense` in
  models/bert.py) and the head; `merge_lora` folds them into the kernels for export.

The train step differentiates only the trainable part (`partition`), and the optimizer is
built over that part alone, so frozen parameters get no gradient and no optimizer state.
"""

from __future__ import annotations

import re

import flax
import jax.numpy as jnp
import numpy as np

STRATEGIES = ("full", "frozen", "top_k", "bitfit", "lora")
HEAD = ("classifier",)  # task heads at the top level of the parameter tree

Path = tuple[str, ...]


def _layer_index(path: Path) -> int | None:
  for part in path:
    m = re.fullmatch(r"layer_(\d+)", part)
    if m:
      return int(m.group(1))
  return None


def num_layers(params) -> int:
  found = {_layer_index(p) for p in flax.traverse_util.flatten_dict(params)}
  found.discard(None)
  return max(found) + 1 if found else 0


def is_trainable(path: Path, strategy: str, *, top_k: int = 0, layers: int = 0) -> bool:
  """Whether the parameter at `path` trains under `strategy`."""
  if strategy == "full":
    return True
  if path[0] in HEAD:
    return True
  if strategy == "frozen":
    return False
  if strategy == "top_k":
    i = _layer_index(path)
    return "pooler" in path or (i is not None and i >= layers - top_k)
  if strategy == "bitfit":
    return path[-1] == "bias"
  if strategy == "lora":
    return path[-1] in ("lora_a", "lora_b")
  raise ValueError(f"config.finetune.strategy={strategy!r}: expected one of {', '.join(STRATEGIES)}")


def trainable_mask(params, strategy: str, top_k: int = 0) -> dict:
  """A tree of bools like `params`: True where the parameter trains."""
  flat = flax.traverse_util.flatten_dict(params)
  layers = num_layers(params)
  if strategy == "top_k" and not 0 < top_k <= layers:
    raise ValueError(f"config.finetune.top_k={top_k}: expected 1..{layers} (the model has {layers} layers)")
  if strategy == "lora" and not any(p[-1] == "lora_a" for p in flat):
    raise ValueError("config.finetune.strategy='lora' but the model has no LoRA adapters (lora_rank=0)")
  mask = {p: is_trainable(p, strategy, top_k=top_k, layers=layers) for p in flat}
  if not any(mask.values()):
    raise ValueError(f"config.finetune.strategy={strategy!r} leaves no trainable parameter in this model")
  return flax.traverse_util.unflatten_dict(mask)


def partition(params, mask) -> tuple[dict, dict]:
  """(trainable, frozen): two nested dicts holding disjoint leaves of `params`."""
  flat = flax.traverse_util.flatten_dict(params)
  m = flax.traverse_util.flatten_dict(mask)
  train = {p: v for p, v in flat.items() if m[p]}
  frozen = {p: v for p, v in flat.items() if not m[p]}
  return flax.traverse_util.unflatten_dict(train), flax.traverse_util.unflatten_dict(frozen)


def combine(trainable, frozen) -> dict:
  """The inverse of `partition`."""
  flat = flax.traverse_util.flatten_dict(frozen) | flax.traverse_util.flatten_dict(trainable)
  return flax.traverse_util.unflatten_dict(flat)


def count(tree) -> int:
  return int(sum(np.prod(np.shape(x)) for x in flax.traverse_util.flatten_dict(tree).values()))


def merge_lora(params, alpha: float, rank: int) -> dict:
  """Fold every adapter into its kernel: W + (alpha / r) A B. Returns a tree without LoRA leaves."""
  flat = flax.traverse_util.flatten_dict(params)
  out = {}
  for p, v in flat.items():
    if p[-1] in ("lora_a", "lora_b"):
      continue
    if p[-1] == "kernel" and (*p[:-1], "lora_a") in flat:
      a, b = flat[(*p[:-1], "lora_a")], flat[(*p[:-1], "lora_b")]
      v = (jnp.asarray(v, jnp.float32) + (alpha / rank) * (jnp.asarray(a, jnp.float32) @ b)).astype(v.dtype)
    out[p] = v
  return flax.traverse_util.unflatten_dict(out)
