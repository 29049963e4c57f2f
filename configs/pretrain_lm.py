"""Pretrain a GPT-style causal LM (pre-LN, tied embeddings) on plain text files.

    python -m research.main --config configs/pretrain_lm.py:model=shakespeare --workdir runs/shakespeare
    python -m research.generate --workdir runs/shakespeare --prompt "ROMEO:" --max_new_tokens 500

Arguments: model=<shakespeare|tiny|small|base> (sizes below), `smoke` for a seconds-long run.
The default corpus is Tiny Shakespeare (../shared/data/lm/, or $LM_DATA_DIR) with a
character-level tokenizer and the last 10% of the text as validation, as in nanoGPT's
shakespeare_char. `shakespeare` has the shape of nanoGPT's documented CPU baseline (4 layers,
4 heads, 128 wide, context 64, batch 12) and its optimizer (AdamW, beta2 0.99, 100 warmup steps
then cosine decay to lr/10, weight decay 0.1, clipping 1.0, no dropout), with rotary positions,
lr 2e-3 and 1500 steps instead of learned positions, lr 1e-3 and 2000 steps: it reaches a lower
val loss in less time (README, benchmarks/char_lm.py). nanoGPT's own recipe is
`--config.model.positions=learned --config.optimizer.lr=1e-3 --config.num_train_steps=2000`.
Other corpora: `--config.data.train_files=a.txt,b.txt --config.data.tokenizer=/path/to/hf_tokenizer`
(for instance one trained by `python -m research.tokenizer`).
"""

from __future__ import annotations

import os
from pathlib import Path

import ml_collections

from configs import common

# name -> (layers, heads, width, context). `shakespeare` is nanoGPT's CPU baseline shape.
SIZES = {
  "tiny": (2, 2, 64, 64),
  "shakespeare": (4, 4, 128, 64),
  "small": (6, 6, 384, 256),  # nanoGPT's shakespeare_char GPU config
  "base": (12, 12, 768, 1024),  # GPT-2 small
}


def default_lm_dir() -> str:
  here = Path(__file__).resolve().parents[1]
  return os.environ.get("LM_DATA_DIR", str(here.parent / "shared" / "data" / "lm"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, model="shakespeare", smoke=False)
  if a.model not in SIZES:
    raise ValueError(f"unknown model size {a.model!r}: expected one of {', '.join(SIZES)}")
  layers, heads, width, context = SIZES[a.model]
  c = common.pretraining("lm")
  c.data = dict(
    train_files=str(Path(default_lm_dir()) / "tinyshakespeare" / "input.txt"),
    val_files="",  # "" = the last val_fraction of train_files
    val_fraction=0.1,
    tokenizer="char",  # char | an HF tokenizer folder / name (e.g. from research.tokenizer)
    document="lines",  # lines | paragraphs: what a document is (HF tokenizers; separators between)
    seq_len=context,
    prefetch=2,
  )
  c.model = ml_collections.ConfigDict(
    dict(
      name=a.model,
      arch="gpt",
      init_from="",
      dtype="float32",
      vocab_size=0,  # 0 = the tokenizer's
      block_size=context,
      num_hidden_layers=layers,
      num_attention_heads=heads,
      hidden_size=width,
      hidden_dropout_prob=0.0,
      bias=False,
      positions="learned",  # learned | rope
      remat=False,  # recompute block activations in the backward pass: less memory, more compute
      dropout_bits="jax",  # jax | hash: dropout's random draws (research/models/dropout.py)
    )
  )
  c.optimizer = common.optimizer(
    lr=1e-3,
    b2=0.99,
    eps=1e-8,
    weight_decay=0.1,
    schedule="cosine",
    warmup_ratio=0.0,
    warmup_steps=100,
    end_lr_ratio=0.1,
  )
  c.batch_size = 12
  c.eval_batch_size = 64
  c.num_train_steps = 2000
  common.run_control(c, eval_every_steps=250, checkpoint_every_steps=250, best_metric="loss")
  if a.model == "shakespeare":
    c.model.positions, c.optimizer.lr, c.num_train_steps, c.eval_every_steps = "rope", 2e-3, 1500, 500
  if a.model == "small":
    c.batch_size, c.num_train_steps, c.model.hidden_dropout_prob = 64, 5000, 0.2
  if a.smoke:
    common.smoke(c)
  c.lock()
  return c
