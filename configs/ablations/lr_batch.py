"""Learning rate x batch size on RTE (MiniLM): the BERT paper's grid, lr in {2,3,5}e-5, batch in {16,32}.

python -m research.sweep --config configs/ablations/lr_batch.py --workdir runs/ablations/lr_batch
"""

from configs.ablations.base import base_config


def get_config(arg=None):
  return base_config(arg, "task=rte,model=minilm", num_epochs=3.0)


def sweep():
  return [{"optimizer.lr": lr, "batch_size": bs} for bs in (16, 32) for lr in (2e-5, 3e-5, 5e-5)]
