"""Pretrained vs random initialization: all-MiniLM-L6-v2 against the same 6x384 shape from scratch, on STS-B.

    python -m research.sweep --config configs/ablations/init.py --workdir runs/ablations/init

Both use the same recipe and MiniLM's tokenizer; only where the encoder weights come from differs.
"""

from configs.ablations.base import base_config


def get_config(arg=None):
  return base_config(arg, "task=stsb,model=minilm", num_epochs=1.0)


def sweep():
  return [
    {"_name": "pretrained"},
    {
      "_name": "random_init",
      "model.init_from": "",
      "model.tokenizer": "minilm",
      "model.hidden_size": 384,
      "model.num_hidden_layers": 6,
      "model.num_attention_heads": 12,
      "model.intermediate_size": 1536,
    },
  ]
