#!/bin/bash
# SST-2 from the shipped MiniLM to a dev score, every stage timed (wall seconds), one command:
#   1. task-adaptive masked-LM pretraining on the SST-2 train sentences (1,200 steps, bf16 matmuls)
#   2. its export as a BertForMaskedLM folder
#   3. one-epoch bf16 fine-tunes from the export (the `mean-ema-llrd-tapt1200bf16-bf16` recipe of
#      configs/ablations/sst2_one_epoch.py), one per seed
#   4. with more than one seed: the uniform weight soup of their final checkpoints, on dev
#
#   bash benchmarks/sst2_tapt_pipeline.sh            # seed 0: one model
#   SEEDS=0,1,2 bash benchmarks/sst2_tapt_pipeline.sh  # three fine-tunes and their soup
#
# Runs in the repository root; writes under runs/ (RUNS=... to change). A stage whose workdir
# already holds a finished run resumes it, i.e. returns at once: remove the workdir to re-time it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs}
SEEDS=${SEEDS:-0}
DATA=${GLUE_DIR:-../shared/data/glue}
TAPT=$RUNS/tapt-sst2-1200-bf16
FT=$RUNS/ablations/sst2_one_epoch/mean-ema-llrd-tapt1200bf16-bf16
mkdir -p "$RUNS"
t_all=$(date +%s)
stage() { # name, command...
  local name=$1 t0
  shift
  t0=$(date +%s)
  "$@"
  echo "STAGE $name: $(($(date +%s) - t0)) s" | tee -a "$RUNS/sst2_tapt_pipeline.times"
}
cut -f1 "$DATA/sst2/train.tsv" | tail -n +2 >"$RUNS/sst2_train.txt"
stage tapt "$PY" -m research.main --config configs/pretrain_mlm.py --config.model.init_from=minilm \
  --config.data.train_files="$RUNS/sst2_train.txt" --config.data.val_fraction=0.02 --config.data.val_files= \
  --config.optimizer.lr=1e-4 --config.num_train_steps=1200 --config.rng_impl=rbg \
  --config.model.matmul_dtype=bfloat16 --config.progress=false --workdir "$TAPT"
stage export "$PY" -m research.predict --workdir "$TAPT" --export_mlm "$TAPT/hf"
souped=()
for seed in ${SEEDS//,/ }; do
  stage "finetune seed $seed" "$PY" -m research.main --config configs/ablations/sst2_one_epoch.py \
    --config.data.glue_dir="$DATA" --config.model.pooling=mean --config.optimizer.lr=1e-4 \
    --config.optimizer.layer_decay=0.8 --config.optimizer.ema=0.999 --config.model.init_from="$TAPT/hf" \
    --config.model.matmul_dtype=bfloat16 --config.seed="$seed" --config.progress=false --workdir "$FT/seed_$seed"
  souped+=("$FT/seed_$seed@latest")
done
if ((${#souped[@]} > 1)); then
  stage soup "$PY" -m research.predict --combine soup --split dev --workdir "$(
    IFS=,
    echo "${souped[*]}"
  )"
fi
echo "STAGE total: $(($(date +%s) - t_all)) s" | tee -a "$RUNS/sst2_tapt_pipeline.times"
