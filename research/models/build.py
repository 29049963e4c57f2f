"""Building the model a config names: BERT (pretrained from a Hugging Face folder, or random),
masked-LM BERT, GPT, or the bag-of-embeddings baseline; and the guard that keeps a workdir's
checkpoints with the model they belong to."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections

from research import parallel
from research.models import convert, dropout
from research.models.bert import FUSED_ATTENTION, BertClassifier, BertConfig, BertForMaskedLM
from research.models.bow import BagOfEmbeddings
from research.models.gpt import GPT, GPTConfig

log = logging.getLogger(__name__)


def _bert_config(mc: ml_collections.ConfigDict, vocab_size: int, base: BertConfig | None = None, **extra) -> BertConfig:
  """The run's BERT: `base` (a loaded checkpoint's architecture) or the config's sizes, with the
  run-time fields the config sets (dropout when >= 0, remat, attention kernel) and `extra`; checked."""
  if base is None:
    base = BertConfig(
      vocab_size=mc.vocab_size or vocab_size,
      hidden_size=mc.hidden_size,
      num_hidden_layers=mc.num_hidden_layers,
      num_attention_heads=mc.num_attention_heads,
      intermediate_size=mc.intermediate_size,
      max_position_embeddings=mc.max_position_embeddings,
    )
  overrides = {k: mc[k] for k in ("hidden_dropout_prob", "attention_probs_dropout_prob") if mc.get(k, -1.0) >= 0}
  overrides |= {
    "remat": mc.get("remat", False),
    "attention": mc.get("attention", "einsum"),
    "dropout_bits": _dropout_bits(mc),
    "matmul_dtype": _matmul_dtype(mc),
  } | extra
  cfg = BertConfig(**(base.to_dict() | overrides))
  check_attention(cfg)
  if cfg.vocab_size < vocab_size:
    raise ValueError(f"tokenizer has {vocab_size} tokens but the model's vocab_size is {cfg.vocab_size}")
  return cfg


def _dropout_bits(mc: ml_collections.ConfigDict) -> str:
  bits = mc.get("dropout_bits", "jax")
  if bits not in dropout.IMPLS:
    raise ValueError(f"config.model.dropout_bits={bits!r}: expected one of {', '.join(dropout.IMPLS)}")
  return bits


def _matmul_dtype(mc: ml_collections.ConfigDict) -> str:
  dt = mc.get("matmul_dtype", "float32")
  if dt not in ("float32", "bfloat16"):
    raise ValueError(f"config.model.matmul_dtype={dt!r}: expected float32 or bfloat16")
  return dt


def check_attention(cfg: BertConfig) -> None:
  if cfg.attention not in ("einsum", *FUSED_ATTENTION):
    raise ValueError(f"config.model.attention={cfg.attention!r}: expected einsum, {', '.join(FUSED_ATTENTION)}")
  if cfg.attention != "einsum" and cfg.attention_probs_dropout_prob > 0:
    raise ValueError(
      f"config.model.attention={cfg.attention!r} (jax.nn.dot_product_attention) has no attention-probability "
      f"dropout, and this model's attention_probs_dropout_prob is {cfg.attention_probs_dropout_prob}; "
      "set --config.model.attention_probs_dropout_prob=0 (or use attention=einsum)"
    )


def build_model(mc: ml_collections.ConfigDict, num_labels: int, vocab_size: int, rng: jax.Array, ft=None, mesh=None):
  """Returns (module, params, architecture dict): pretrained from `init_from`, else random.

  `ft` (config.finetune) adds LoRA adapters when its strategy is "lora". With a `mesh`, random
  parameters are created straight into their jit layout (sharded under fsdp)."""
  ids = jnp.zeros((1, 8), jnp.int32)

  def init(fn):
    return (parallel.init_sharded(fn, rng, mesh=mesh) if mesh is not None else jax.jit(fn)(rng))["params"]

  if mc.arch in ("gpt", "bow") and _matmul_dtype(mc) != "float32":
    raise ValueError(f"config.model.matmul_dtype: bf16 matmuls are wired into BERT only, not arch={mc.arch!r}")
  if mc.arch == "gpt":
    if mc.get("attention", "einsum") != "einsum":
      raise ValueError("config.model.attention: the fused kernels are wired into BERT only; use einsum for GPT")
    cfg = GPTConfig(
      vocab_size=mc.vocab_size or vocab_size,
      block_size=mc.block_size,
      num_layers=mc.num_hidden_layers,
      num_heads=mc.num_attention_heads,
      hidden_size=mc.hidden_size,
      dropout=max(mc.hidden_dropout_prob, 0.0),
      bias=mc.bias,
      positions=mc.positions,
      remat=mc.get("remat", False),
      dropout_bits=_dropout_bits(mc),
    )
    model = GPT(cfg, dtype=jnp.dtype(mc.dtype))
    return model, init(lambda r: model.init(r, ids)), {"arch": "gpt", **cfg.to_dict()}
  if mc.arch == "bert_mlm":  # masked-LM pretraining: from scratch, or continued from `init_from`
    loaded = _load_pretrained(mc.init_from, convert.load_hf_for_mlm) if mc.get("init_from") else None
    cfg = _bert_config(mc, vocab_size, loaded[0] if loaded else None)
    model = BertForMaskedLM(
      cfg, dtype=jnp.dtype(mc.dtype), last_layer_masked_only=mc.get("last_layer_masked_only", True)
    )
    params = init(lambda r: model.init(r, ids, ids, ids, train=False))
    if loaded:
      params = convert.merge_loaded(params, loaded[1], mc.init_from)
      log.info("%s: encoder loaded; masked-LM head %s", mc.init_from, "loaded" if loaded[2] else "initialized fresh")
    return model, params, {"arch": "bert_mlm", **cfg.to_dict()}
  if mc.arch == "bow":
    if mc.init_from:
      raise ValueError("config.model.arch='bow' is trained from scratch; set config.model.init_from=''")
    cfg = {"arch": "bow", "vocab_size": mc.vocab_size or vocab_size, "hidden_size": mc.hidden_size}
    model = BagOfEmbeddings(cfg["vocab_size"], cfg["hidden_size"], num_labels, dtype=jnp.dtype(mc.dtype))
    return model, init(lambda r: model.init(r, ids, ids, ids)), cfg
  base, encoder, heads, _ = _load_pretrained(mc.init_from) if mc.init_from else (None, None, None, None)
  lora = {}
  if ft is not None and ft.strategy == "lora":
    if ft.lora_rank <= 0:
      raise ValueError(f"config.finetune.lora_rank={ft.lora_rank}: must be > 0 with strategy 'lora'")
    lora = {"lora_rank": ft.lora_rank, "lora_alpha": ft.lora_alpha, "lora_targets": tuple(ft.lora_targets)}
  cfg = _bert_config(mc, vocab_size, base, **lora)
  model = BertClassifier(
    cfg,
    num_labels,
    dtype=jnp.dtype(mc.dtype),
    pooling=mc.pooling,
    last_layer_cls_only=mc.get("last_layer_cls_only", True),
  )
  params = init(lambda r: model.init(r, ids, ids, ids, train=False))
  if mc.init_from:
    params = convert.merge_pretrained(params, encoder, heads, num_labels)
  return model, params, {"arch": "bert", "pooling": mc.pooling, **cfg.to_dict()}


# Architecture fields that change no parameter shape: a resumed run may change them.
_FREE_ARCH_FIELDS = {
  "remat",
  "attention",
  "hidden_dropout_prob",
  "attention_probs_dropout_prob",
  "dropout",
  "dropout_bits",
  "matmul_dtype",
}


def _load_pretrained(init_from: str, load=convert.load_hf_folder):
  try:
    return load(init_from)
  except convert.WeightsError as e:  # the message names the folder or file; say which field led there
    raise convert.WeightsError(f"config.model.init_from: {e}") from None


def changed_fields(old: dict, new: dict, ignore=()) -> list[str]:
  """ "key: old -> new" for each key of two flat dicts whose values differ, in key order."""
  keys = sorted(k for k in old.keys() | new.keys() if k not in ignore and old.get(k) != new.get(k))
  return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys]


def check_same_model(workdir: Path, arch: dict) -> None:
  """A workdir holding checkpoints belongs to its model: a different one fails here, naming the
  fields, before config.json or model_config.json is overwritten."""
  saved = workdir / "model_config.json"
  ckpts = workdir / "checkpoints"
  if not saved.exists() or not ckpts.is_dir() or not any(p.name.isdigit() for p in ckpts.iterdir()):
    return
  changes = changed_fields(json.loads(saved.read_text()), json.loads(json.dumps(arch)), ignore=_FREE_ARCH_FIELDS)
  if changes:
    raise ValueError(
      f"{workdir} holds checkpoints of a different model ({', '.join(changes)}); nothing was changed there. "
      "Use a new --workdir, or delete that one to start over."
    )
