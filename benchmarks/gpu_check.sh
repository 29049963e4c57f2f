#!/usr/bin/env bash
# The GPU part of the performance issue in one run: BERT-base train steps at seq 128 and 512 in
# bf16 (fp32 master weights), ours beside transformers' PyTorch eager (autocast bf16) on the same
# GPU, each row's MFU against the bf16 matmul peak measured in the same run, plus our step with
# cuDNN's fused attention (`--fused cudnn`: einsum and cuDNN rows, both without attention dropout).
#
# Made for the `device` tool's lent H100/H200, whose image has CUDA JAX, torch and transformers
# but not ml_collections (and may hold older flax/optax). Two steps:
#
#   here, once (a machine with pip):  bash benchmarks/gpu_check.sh --fetch
#       downloads those pure-Python wheels into .whl/ (git-ignored via .git/info/exclude)
#   on the GPU, carrying .whl:        bash benchmarks/gpu_check.sh
#       logs to $OUT (the device tool's output folder) or benchmarks/results/gpu/; ~8 minutes
#
# Batches are 256 x 128 and 64 x 512 tokens (32K tokens a step), enough to fill an H100/H200
# (the logs give the peak device memory); override with BATCH_128= and BATCH_512=.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch" ]]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
  py=.venv/bin/python; [[ -x $py ]] || py=python3  # any Python with pip: the wheels are pure Python
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform any -d .whl \
    ml_collections==1.1.0 flax==0.12.12 optax==0.2.8 treescope
  ls -l .whl
  exit
fi

out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$py" -c 'import jax, flax, optax, torch, transformers; print("jax", jax.__version__, jax.devices(), "| flax", flax.__version__, "| optax", optax.__version__, "| torch", torch.__version__, "| transformers", transformers.__version__)'
} 2>&1 | tee "$out/versions.txt"

rc=0
for seq in 128 512; do
  batch=$([[ $seq == 128 ]] && echo "${BATCH_128:-256}" || echo "${BATCH_512:-64}")
  timeout 300 "$py" benchmarks/train_step.py --shapes bert-base --seq "$seq" --batch "$batch" --dtype bfloat16 \
    --rng-impl rbg --fused cudnn --steps 20 --warmup 5 --torch-python "$py" --torch-device cuda \
    2>&1 | tee "$out/train_step_bert-base_seq${seq}.log" || rc=1
done
exit $rc
