"""SST-2 recipe search toward the slice's 90.5 dev target: weight averaging and layer-wise lr decay.

    python -m research.sweep --config configs/ablations/sst2_recipe.py --workdir runs/ablations/sst2_recipe --seeds 0

Shipped all-MiniLM-L6-v2, mean pooling, 2 epochs (4,210 steps of batch 32), dev every 250 steps.
The baseline without either lever is the README's `runs/sst2-mean-2ep` (89.68 final, seed 0).
- `ema`: the BERT recipe (AdamW 5e-5, 10% warmup, linear decay) with an exponential moving
  average of the weights (decay 0.999, ~1,000 steps), which is what is evaluated and kept.
- `ema-llrd`: lr 1e-4 with layer-wise decay 0.8 (the classifier at 1e-4, the top layer 8e-5,
  ..., the bottom layer 2.6e-5, the embeddings 2.1e-5), plus the same average.
"""

from __future__ import annotations

from configs import glue


def get_config(arg: str | None = None):
  c = glue.get_config(arg or "task=sst2,model=minilm")
  c.unlock()
  c.model.pooling = "mean"
  c.num_epochs = 2.0
  c.eval_every_steps = c.checkpoint_every_steps = 250
  c.optimizer.ema = 0.999
  c.lock()
  return c


def sweep() -> list[dict]:
  return [
    {"_name": "ema"},
    {"_name": "ema-llrd", "optimizer.lr": 1e-4, "optimizer.layer_decay": 0.8},
  ]
