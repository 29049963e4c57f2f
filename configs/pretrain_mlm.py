"""Pretrain a BERT with masked language modeling on plain text, then fine-tune it on GLUE.

    python -m research.tokenizer --kind wordpiece --files ../shared/data/lm/wikitext2/wiki.valid.raw \
        --vocab_size 8000 --out runs/tokenizers/wiki-wp8k
    python -m research.main --config configs/pretrain_mlm.py:model=small \
        --workdir runs/mlm-small --config.data.tokenizer=runs/tokenizers/wiki-wp8k
    python -m research.predict --workdir runs/mlm-small --export_mlm runs/mlm-small/hf   # BertForMaskedLM
    python -m research.main --config configs/glue.py:task=rte,model=tiny \
        --config.model.init_from=runs/mlm-small/hf --workdir runs/rte-from-mlm

Masking: 15% of tokens, 80% [MASK] / 10% random / 10% kept (`data.whole_word` for whole-word
masking; `data.mask_count=exact` for exactly round(15%) per row, as BERT's own data generator,
which needs 20 prediction slots a row at 128 tokens instead of 33: 1.13x the SST-2 TAPT run's
steps/s, but its fine-tunes scored 0.46 lower over three seeds, benchmarks/results/PERFORMANCE.md, "Exactly 15% a row"); the
loss and MLM accuracy count masked positions only; perplexity = exp(loss).
Sequences are packed from the token stream with [SEP] between documents (no padding).
The default corpus is WikiText-2 raw: `valid` to train and `test` to evaluate (its train split
is not in the offline data). Sizes: tiny (2x64), small (4x256), base (12x768).

Continued pretraining of a pretrained BERT (Gururangan et al. 2020, task-adaptive: the task's
own unlabeled text), then fine-tuning from the export:

    cut -f1 ../shared/data/glue/sst2/train.tsv | tail -n +2 > runs/sst2_train.txt
    python -m research.main --config configs/pretrain_mlm.py --config.model.init_from=minilm \
        --config.data.train_files=runs/sst2_train.txt --config.data.val_fraction=0.02 \
        --config.data.val_files= --config.optimizer.lr=1e-4 --workdir runs/tapt-sst2
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from configs import common
from configs.pretrain_lm import default_lm_dir

# name -> (layers, heads, width, intermediate)
SIZES = {"tiny": (2, 2, 64, 128), "small": (4, 4, 256, 1024), "base": (12, 12, 768, 3072)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, model="small", smoke=False)
  if a.model not in SIZES:
    raise ValueError(f"unknown model size {a.model!r}: expected one of {', '.join(SIZES)}")
  layers, heads, width, inter = SIZES[a.model]
  wiki = Path(default_lm_dir()) / "wikitext2"
  c = common.pretraining("mlm")
  c.data = dict(
    train_files=str(wiki / "wiki.valid.raw"),
    val_files=str(wiki / "wiki.test.raw"),
    val_fraction=0.0,
    tokenizer="minilm",  # a WordPiece folder (python -m research.tokenizer) or a preset/hub name
    document="lines",
    seq_len=128,
    mask_prob=0.15,
    whole_word=False,
    mask_count="bernoulli",  # bernoulli | exact: masked tokens per row (research/data/lm.py MaskedLM)
    prefetch=2,
  )
  c.model = ml_collections.ConfigDict(
    dict(
      name=a.model,
      arch="bert_mlm",
      # Continued (domain/task-adaptive) pretraining: an HF BERT folder, preset or hub id; its own
      # architecture is used (the sizes below are ignored) and a missing MLM head starts fresh.
      init_from="",
      dtype="float32",
      vocab_size=0,
      num_hidden_layers=layers,
      num_attention_heads=heads,
      hidden_size=width,
      intermediate_size=inter,
      max_position_embeddings=512,
      hidden_dropout_prob=0.1,
      remat=False,  # recompute layer activations in the backward pass: less memory, more compute
      dropout_bits="jax",  # jax | hash: dropout's random draws (research/models/dropout.py)
      # float32 | bfloat16: the dense layers' matmul operands (fp32 results; configs/common.py)
      matmul_dtype="float32",
      # the last layer only at the masked positions the head reads (exact; its dropout draws differ)
      last_layer_masked_only=True,
    )
  )
  c.optimizer = common.optimizer(lr=1e-3 if a.model != "base" else 1e-4, b2=0.98, warmup_ratio=0.06)
  c.batch_size = 32
  c.eval_batch_size = 64
  c.num_train_steps = 3000
  common.run_control(c, log_every_steps=50, eval_every_steps=250, checkpoint_every_steps=250, best_metric="loss")
  if a.smoke:
    common.smoke(c)
    c.data.seq_len = 64
  c.lock()
  return c
