"""Losses on MRPC (MiniLM): cross-entropy, label smoothing, focal, class-weighted cross-entropy.

    python -m research.sweep --config configs/ablations/losses.py --workdir runs/ablations/losses

MRPC is 68% paraphrases, so the class weights are the inverse class frequencies (1/0.32, 1/0.68) / 2.
Distillation is not in this grid: it needs a teacher run (`--config.loss=distill --config.teacher=runs/...`).
"""

from configs.ablations.base import base_config


def get_config(arg=None):
  return base_config(arg, "task=mrpc,model=minilm", num_epochs=3.0)


def sweep():
  return [
    {"loss": "softmax_xent"},
    {"loss": "label_smoothing", "loss_kwargs.smoothing": 0.1},
    {"loss": "focal", "loss_kwargs.gamma": 2.0},
    {"loss": "class_weighted_xent", "loss_kwargs.class_weights": (1.56, 0.74)},
  ]
