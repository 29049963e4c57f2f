"""Fine-tuning strategies: full, frozen encoder, top-2 layers, BitFit, LoRA r=8 on STS-B (MiniLM).

    python -m research.sweep --config configs/ablations/strategies.py --workdir runs/ablations/strategies

Parameter-efficient strategies train few parameters and take the larger learning rates their
papers use (BitFit 1e-3, LoRA 5e-4 with alpha 16); full and top-k use the BERT recipe's 5e-5.
"""

from configs.ablations.base import base_config


def get_config(arg=None):
  return base_config(arg, "task=stsb,model=minilm", num_epochs=1.0)


def sweep():
  return [
    {"_name": "full", "finetune.strategy": "full", "optimizer.lr": 5e-5},
    {"_name": "frozen", "finetune.strategy": "frozen", "optimizer.lr": 1e-3},
    {"_name": "top2", "finetune.strategy": "top_k", "finetune.top_k": 2, "optimizer.lr": 5e-5},
    {"_name": "bitfit", "finetune.strategy": "bitfit", "optimizer.lr": 1e-3},
    {"_name": "lora_r8", "finetune.strategy": "lora", "finetune.lora_rank": 8, "optimizer.lr": 5e-4},
  ]
