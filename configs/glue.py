"""Fine-tune a BERT on a GLUE task (single sentences, pairs, or regression).

    python -m research.main --config configs/glue.py:task=sst2,model=minilm --workdir runs/sst2

Arguments: task=<cola|sst2|mrpc|qqp|stsb|mnli|qnli|rte|wnli>, model=<preset in configs/common.py>,
and `smoke` for a one-minute run on a slice of the data. Any field can be overridden:
`--config.optimizer.lr=3e-5`. Data comes from `data.glue_dir` (default: $GLUE_DIR, else
../shared/data/glue) or from TFDS with `--config.data.source=tfds`.
"""

from __future__ import annotations

import ml_collections

from configs import common
from research.data import tasks
from research.data.sources import default_glue_dir

# Per-task defaults that differ from the BERT paper recipe below (as data).
TASK_DEFAULTS = {
  "sst2": dict(num_epochs=3.0, eval_every_steps=1000, checkpoint_every_steps=1000),
  "cola": dict(num_epochs=3.0),
  "mrpc": dict(num_epochs=3.0),
  "stsb": dict(num_epochs=3.0),
  "rte": dict(num_epochs=3.0),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, task="sst2", model="minilm", smoke=False)
  tasks.get_task(a.task)  # an unknown task fails here, naming the nearest
  c = ml_collections.ConfigDict()
  c.task = a.task
  c.eval_split = "dev"
  c.seed = 0
  c.rng_impl = "threefry2x32"  # dropout bits; "rbg": XLA's RngBitGenerator, layout-dependent

  c.data = dict(
    source="auto",  # auto | tsv | tfds
    glue_dir=default_glue_dir(),
    tfds_data_dir="",
    max_length=128,
    # padded lengths, one compiled program each; finer where most sentences are (SST-2: 1.09M
    # tokens per epoch vs 1.18M with (8, 16, 24, 32, 48, 64, 96, 128), 10 shapes instead of 7)
    buckets=(8, 12, 16, 20, 24, 32, 40, 48, 64, 96, 128),
    sort_window=64,  # batches sorted together by length before shuffling
    # Sequence packing for training (0 = off): each step is pack_rows rows of max_length tokens
    # holding as many whole examples as fit (block-diagonal attention, positions restart per
    # example; one compiled program, ~no padding). batch_size is then unused for training: a
    # step holds ~pack_rows * max_length / mean length examples (SST-2, 4 rows: ~37).
    pack_rows=0,
    # examples per packed row at most: each slot costs pooling work (and a [CLS] query in the
    # last layer); SST-2 rows of 128 tokens hold 9.3 on average, 18 at most (16: the same steps)
    pack_max_segments=16,
    max_train_examples=0,  # 0 = all
    max_eval_examples=0,
    prefetch=2,  # batches put on device ahead of the step
  )
  c.model = common.model_config(a.model)

  c.loss = ""  # "" = the task's default (softmax_xent, or mse for STS-B); see research/losses.py
  c.loss_kwargs = dict(smoothing=0.1, gamma=2.0, delta=1.0, class_weights=(), temperature=2.0, alpha=0.5)
  # Knowledge distillation (loss="distill"): the teacher is a training workdir of this
  # codebase (its best checkpoint scores the train set once, before training), or several,
  # comma-separated, whose logits are averaged (an ensemble); `dir@latest` / `dir@STEP` pick
  # another checkpoint than the best.
  c.teacher = ""
  # R-Drop (Liang et al. 2021): > 0 passes every example through the model twice under different
  # dropout masks and adds alpha x the symmetric KL of the two predictions (research/steps.py);
  # twice the compute per step. The paper used alpha in 0.1-1.0 on GLUE.
  c.rdrop_alpha = 0.0

  # Which parameters train (research/finetune.py): full | frozen | top_k | bitfit | lora.
  c.finetune = dict(strategy="full", top_k=2, lora_rank=8, lora_alpha=16.0, lora_targets=("query", "value"))

  # BERT paper recipe: AdamW, lr in {2,3,5}e-5, batch 32, 10% warmup then linear decay.
  c.optimizer = common.optimizer()
  c.batch_size = 32
  c.eval_batch_size = 64
  c.num_epochs = 3.0
  c.num_train_steps = 0  # > 0 overrides num_epochs

  common.run_control(c)

  c.update(TASK_DEFAULTS.get(a.task, {}))
  if a.smoke:
    c.data.max_train_examples = 256
    c.data.max_eval_examples = 128
    c.num_train_steps = 16
    c.eval_every_steps = 8
    c.log_every_steps = 4
    c.checkpoint_every_steps = 8
  c.lock()
  return c
