"""Optimizers: sgd, momentum, adam, adamw, lamb, adafactor, lion on STS-B (MiniLM).

    python -m research.sweep --config configs/ablations/optimizers.py --workdir runs/ablations/optimizers

Each optimizer runs at its commonly recommended fine-tuning learning rate (no per-optimizer
tuning), with the same warmup + linear decay, clipping and weight decay (where it has one).
"""

from configs.ablations.base import base_config


def get_config(arg=None):
  return base_config(arg, "task=stsb,model=minilm", num_epochs=1.0)


# name -> learning rate. Lion wants ~3-10x less than AdamW; Adafactor's lr is relative to
# the parameter scale; SGD needs a far larger step than the adaptive methods.
LEARNING_RATES = {
  "sgd": 3e-2,
  "momentum": 3e-3,
  "adam": 5e-5,
  "adamw": 5e-5,
  "lamb": 2e-3,
  "adafactor": 1e-3,
  "lion": 1e-5,
}


def sweep():
  return [{"optimizer.name": name, "optimizer.lr": lr} for name, lr in LEARNING_RATES.items()]
