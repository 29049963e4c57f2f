"""What MLM pretraining buys: a small BERT fine-tuned from our WikiText-2 MLM checkpoint vs from random init.

    python -m research.tokenizer --kind wordpiece --files ../shared/data/lm/wikitext2/wiki.valid.raw \
        --vocab_size 8000 --out runs/tokenizers/wiki-wp8k
    python -m research.main --config configs/pretrain_mlm.py:model=small \
        --config.data.tokenizer=runs/tokenizers/wiki-wp8k --workdir runs/mlm-small
    python -m research.predict --workdir runs/mlm-small --export_mlm runs/mlm-small/hf
    python -m research.sweep --config configs/ablations/mlm_transfer.py --workdir runs/ablations/mlm_transfer

Both arms are the same architecture (configs/pretrain_mlm.py's `small`: 4 layers, 256 wide,
4 heads, MLP 1024) with the same WordPiece vocabulary; only the initial weights differ. Mean
pooling in both (the MLM export has no pooler). $MLM_HF points at another exported folder.
"""

from __future__ import annotations

import os

from configs import glue
from configs.pretrain_mlm import SIZES

MLM_HF = os.environ.get("MLM_HF", "runs/mlm-small/hf")
TOKENIZER = os.environ.get("MLM_TOKENIZER", "runs/tokenizers/wiki-wp8k")
EPOCHS = {"sst2": 1.0, "rte": 3.0}


def get_config(arg: str | None = None):
  c = glue.get_config(arg or "task=rte,model=tiny")
  c.unlock()
  layers, heads, width, inter = SIZES["small"]
  c.model.update(
    dict(
      tokenizer=TOKENIZER,
      num_hidden_layers=layers,
      num_attention_heads=heads,
      hidden_size=width,
      intermediate_size=inter,
      max_position_embeddings=512,
      pooling="mean",
    )
  )
  c.optimizer.lr = 1e-4  # small BERTs fine-tune best at 1e-4 and up (Turc et al. 2019)
  c.num_epochs = EPOCHS.get(c.task, 3.0)
  c.eval_every_steps = c.checkpoint_every_steps = 300 if c.task == "sst2" else 40
  c.log_every_steps = 20
  c.lock()
  return c


def sweep() -> list[dict]:
  out = []
  for task in EPOCHS:
    out.append({"_name": f"{task}-random-init", "_arg": f"task={task},model=tiny"})
    out.append({"_name": f"{task}-mlm-init", "_arg": f"task={task},model=tiny", "model.init_from": MLM_HF})
  return out
