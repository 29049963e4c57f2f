#!/bin/bash
# SST-2 from the shipped MiniLM to a dev score, every stage timed (wall seconds), one command:
#   1. task-adaptive masked-LM pretraining on the SST-2 train sentences (1,200 steps, bf16 matmuls)
#   2. its export as a BertForMaskedLM folder
#   3. one-epoch bf16 fine-tunes from the export (the `mean-ema-llrd-tapt1200bf16-bf16` recipe of
#      configs/ablations/sst2_one_epoch.py), one per seed
#   4. with more than one seed: the uniform weight soup of their final checkpoints, on dev
#
#   bash benchmarks/sst2_tapt_pipeline.sh              # seed 0: one model
#   SEEDS=0,1,2 bash benchmarks/sst2_tapt_pipeline.sh  # three fine-tunes and their soup
#
# Runs in the repository root and writes under runs/, where the recipe's row in
# configs/ablations/sst2_one_epoch.py looks for the export; the fine-tune commands are the ones that
# sweep prints for that row (one source for the recipe). GLUE comes from $GLUE_DIR, else
# ../shared/data/glue. A stage whose workdir already holds a finished run returns at once (the
# sweep prints no command for it): remove the workdir to re-time it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-0}
TAPT=runs/tapt-sst2-1200-bf16
ROW=mean-ema-llrd-tapt1200bf16-bf16
FT=runs/ablations/sst2_one_epoch/$ROW
mkdir -p runs
t_all=$(date +%s)
stage() { # name, command...
  local name=$1 t0
  shift
  t0=$(date +%s)
  "$@"
  echo "STAGE $name: $(($(date +%s) - t0)) s" | tee -a runs/sst2_tapt_pipeline.times
}
train=${GLUE_DIR:-../shared/data/glue}/sst2/train.tsv
[[ -f $train ]] || train=${GLUE_DIR:-../shared/data/glue}/SST-2/train.tsv
cut -f1 "$train" | tail -n +2 >runs/sst2_train.txt
stage tapt "$PY" -m research.main --config configs/pretrain_mlm.py --config.model.init_from=minilm \
  --config.data.train_files=runs/sst2_train.txt --config.data.val_fraction=0.02 --config.data.val_files= \
  --config.optimizer.lr=1e-4 --config.num_train_steps=1200 --config.rng_impl=rbg \
  --config.model.matmul_dtype=bfloat16 --config.progress=false --workdir "$TAPT"
stage export "$PY" -m research.predict --workdir "$TAPT" --export_mlm "$TAPT/hf"
"$PY" -m research.sweep --config configs/ablations/sst2_one_epoch.py --workdir runs/ablations/sst2_one_epoch \
  --seeds "$SEEDS" --print_commands | grep -F "/$ROW/" >runs/sst2_tapt_pipeline.commands || true
while read -r cmd; do
  workdir=${cmd##*--workdir=}
  stage "finetune ${workdir%% *}" bash -c "$cmd" </dev/null
done <runs/sst2_tapt_pipeline.commands
souped=$(for seed in ${SEEDS//,/ }; do printf '%s,' "$FT/seed_$seed@latest"; done)
if [[ $SEEDS == *,* ]]; then
  stage soup "$PY" -m research.predict --combine soup --split dev --workdir "${souped%,}"
fi
echo "STAGE total: $(($(date +%s) - t_all)) s" | tee -a runs/sst2_tapt_pipeline.times
