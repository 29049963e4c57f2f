#!/usr/bin/env bash
# Launch the same training command on every worker (multi-host: jax.distributed joins them).
# The run resumes from its workdir, so relaunching after preemption continues it.
#   tpu/run.sh --name my-tpu --tfds-data-dir gs://bucket/tfds -- \
#     --config configs/glue.py:task=sst2,model=minilm --workdir gs://bucket/runs/sst2
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tpu/common.sh
. "$here/common.sh"
parse_common "$@"

if [ ${#ARGS[@]} -eq 0 ]; then
  echo "error: give the research.main arguments after --" >&2
  exit 2
fi
quoted=$(printf '%q ' "${ARGS[@]}")
env_vars="HF_HUB_OFFLINE=\${HF_HUB_OFFLINE:-0}"
[ -n "$TFDS_DATA_DIR" ] && env_vars="$env_vars TFDS_DATA_DIR=$TFDS_DATA_DIR"
tpu_ssh "cd ~/$REMOTE_DIR && $env_vars nohup ~/venv/bin/python -m research.main ${quoted}--config.distributed=True \
> ~/research-run.log 2>&1 < /dev/null &"
