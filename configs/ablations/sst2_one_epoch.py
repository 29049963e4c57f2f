"""SST-2 in one epoch on packed rows, the fast path: does the short schedule hold up over seeds?

    python -m research.sweep --config configs/ablations/sst2_one_epoch.py --workdir runs/ablations/sst2_one_epoch --seeds 0,1,2

Why: in `benchmarks/finetune_sst2.py` (one epoch, BERT recipe) the packed run ended at 90.14 dev
and the length-bucket run at 89.56, above every 2- and 3-epoch recipe's final weights
(88.8-89.7), which overfit in their later epochs. Shipped all-MiniLM-L6-v2, AdamW lr 5e-5, 10%
warmup then linear decay to 0 over one epoch, sequence packing (4 rows x 128 tokens per step,
~37 sentences, 1,801 steps), RngBitGenerator dropout bits, dev every 300 steps.
- `cls`: BERT's pooled [CLS] head (the benchmark's recipe).
- `mean`: mean pooling over each sentence's tokens, what this checkpoint was trained for.
- `cls-frozen-emb`: `cls` with the embedding block frozen (`finetune.strategy=top_k`, all six
  layers): the 11.9M-parameter embedding table gets no gradient scatter and no AdamW update,
  ~14% more steps per second on this CPU. Does accuracy hold?
- `mean-tapt`: `mean` from all-MiniLM-L6-v2 after task-adaptive masked-LM pretraining on the
  SST-2 train sentences (Gururangan et al. 2020; 400 steps, the MLM head trained from scratch
  since the checkpoint has none). Run the pretraining first (commands in configs/pretrain_mlm.py):
      python -m research.main --config configs/pretrain_mlm.py --config.model.init_from=minilm \
        --config.data.train_files=runs/sst2_train.txt --config.data.val_fraction=0.02 \
        --config.data.val_files= --config.optimizer.lr=1e-4 --config.num_train_steps=400 \
        --config.rng_impl=rbg --workdir runs/tapt-sst2
      python -m research.predict --workdir runs/tapt-sst2 --export_mlm runs/tapt-sst2/hf
- `mean-tapt1200`: the same with three times the pretraining (1,200 steps, ~6 passes over the
  sentences; 400 steps left the fresh MLM head at 23% masked-token accuracy). The same two
  commands with `--config.num_train_steps=1200` and the workdir `runs/tapt-sst2-1200`.
- `mean-tapt2400`: twice that again: 1,200 more steps continued from the `mean-tapt1200` export
  (the held-out MLM loss was still falling at step 1,200), with a fresh warmup and AdamW state
  and seed 1 for new masks and order:
      python -m research.main --config configs/pretrain_mlm.py --config.model.init_from=runs/tapt-sst2-1200/hf \
        --config.data.train_files=runs/sst2_train.txt --config.data.val_fraction=0.02 \
        --config.data.val_files= --config.optimizer.lr=1e-4 --config.num_train_steps=1200 \
        --config.rng_impl=rbg --config.seed=1 --workdir runs/tapt-sst2-2400
      python -m research.predict --workdir runs/tapt-sst2-2400 --export_mlm runs/tapt-sst2-2400/hf
- `mean-rdrop`: `mean` with R-Drop (Liang et al. 2021, alpha 1): each sentence goes through the
  model twice under different dropout masks, and the symmetric KL of the two predictions is
  added to the loss. Twice the compute per step.
- `mean-sam`: `mean` with sharpness-aware minimization (Foret et al. 2021, rho 0.05): each step
  uses the gradient at the weights moved rho along the normalized gradient. Twice the compute.
- `cls-hash`: `cls` with dropout draws from a keyed index hash (`model.dropout_bits=hash`, see
  research/models/dropout.py), computed inside the fusion that applies each mask: ~3% faster
  epochs. Does accuracy hold over seeds, i.e. could it be the default?
- `cls-bf16`: `cls` with bf16 matmul operands (`model.matmul_dtype=bfloat16`: the dense layers
  multiply bf16 into fp32, forward and backward; all else fp32): ~1.8x the steps per second on a
  CPU with AMX. Does accuracy hold over seeds?
- `mean-ema-llrd-tapt1200bf16`: the two-epoch `ema-llrd-tapt1200` recipe of
  configs/ablations/sst2_recipe.py (mean pooling, lr 1e-4, layer-wise lr decay 0.8, weight EMA
  0.999), whose runs peaked on dev around steps 1,500-2,500 of 4,210 and then fell back (best
  90.5 +- 0.1, final 90.1 +- 0.2), in one epoch on packed rows, so that the schedule ends near
  that peak. From a 1,200-step TAPT run with bf16 matmuls (~1.27x the steps per second of an fp32
  run on an earlier day, AMX host); the fine-tune itself is fp32:
      python -m research.main --config configs/pretrain_mlm.py --config.model.init_from=minilm \
        --config.data.train_files=runs/sst2_train.txt --config.data.val_fraction=0.02 \
        --config.data.val_files= --config.optimizer.lr=1e-4 --config.num_train_steps=1200 \
        --config.rng_impl=rbg --config.model.matmul_dtype=bfloat16 --workdir runs/tapt-sst2-1200-bf16
      python -m research.predict --workdir runs/tapt-sst2-1200-bf16 --export_mlm runs/tapt-sst2-1200-bf16/hf
- `mean-ema-llrd-tapt1200bf16-bf16`: the same with the fine-tune in bf16 matmuls too (~1.8x its
  steps per second on the AMX host): do three seeds still soup to 90.5 at about half the time?
- `mean-ema-llrd-tapt800bf16-bf16`: the same from a shorter TAPT run (800 steps, 4 passes) with
  index-hash dropout draws too, so that pretraining plus one fine-tune fit in under an hour:
      python -m research.main --config configs/pretrain_mlm.py --config.model.init_from=minilm \
        --config.data.train_files=runs/sst2_train.txt --config.data.val_fraction=0.02 \
        --config.data.val_files= --config.optimizer.lr=1e-4 --config.num_train_steps=800 \
        --config.rng_impl=rbg --config.model.matmul_dtype=bfloat16 --config.model.dropout_bits=hash \
        --workdir runs/tapt-sst2-800-bf16
      python -m research.predict --workdir runs/tapt-sst2-800-bf16 --export_mlm runs/tapt-sst2-800-bf16/hf
"""

from __future__ import annotations

from configs import glue


def get_config(arg: str | None = None):
  c = glue.get_config(arg or "task=sst2,model=minilm")
  c.unlock()
  c.num_epochs = 1.0
  c.data.pack_rows = 4
  c.rng_impl = "rbg"
  c.eval_every_steps = c.checkpoint_every_steps = 300
  c.lock()
  return c


# The `ema-llrd` recipe of configs/ablations/sst2_recipe.py with mean pooling and the weight EMA.
EMA_LLRD = {"model.pooling": "mean", "optimizer.lr": 1e-4, "optimizer.layer_decay": 0.8, "optimizer.ema": 0.999}


def sweep() -> list[dict]:
  return [
    {"_name": "cls"},
    {"_name": "mean", "model.pooling": "mean"},
    {"_name": "cls-frozen-emb", "finetune.strategy": "top_k", "finetune.top_k": 6},
    {"_name": "mean-tapt", "model.pooling": "mean", "model.init_from": "runs/tapt-sst2/hf"},
    {"_name": "mean-tapt1200", "model.pooling": "mean", "model.init_from": "runs/tapt-sst2-1200/hf"},
    {"_name": "mean-tapt2400", "model.pooling": "mean", "model.init_from": "runs/tapt-sst2-2400/hf"},
    {"_name": "mean-rdrop", "model.pooling": "mean", "rdrop_alpha": 1.0},
    {"_name": "mean-sam", "model.pooling": "mean", "optimizer.sam_rho": 0.05},
    {"_name": "cls-hash", "model.dropout_bits": "hash"},
    {"_name": "cls-bf16", "model.matmul_dtype": "bfloat16"},
    {"_name": "mean-ema-llrd-tapt1200bf16", **EMA_LLRD, "model.init_from": "runs/tapt-sst2-1200-bf16/hf"},
    {
      "_name": "mean-ema-llrd-tapt1200bf16-bf16",
      **EMA_LLRD,
      "model.init_from": "runs/tapt-sst2-1200-bf16/hf",
      "model.matmul_dtype": "bfloat16",
    },
    {
      "_name": "mean-ema-llrd-tapt800bf16-bf16",
      **EMA_LLRD,
      "model.init_from": "runs/tapt-sst2-800-bf16/hf",
      "model.matmul_dtype": "bfloat16",
    },
  ]
