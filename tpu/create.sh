#!/usr/bin/env bash
# Create a TPU VM through a queued resource (spot by default) and wait until it is ACTIVE.
#   tpu/create.sh --name my-tpu --zone us-central2-b --accelerator v4-8 [--no-spot] [--dry-run]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tpu/common.sh
. "$here/common.sh"
parse_common "$@"

spot=()
[ "$SPOT" = 1 ] && spot=(--spot)
run gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" --zone="$ZONE" \
  --project="$PROJECT" --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" "${spot[@]}"

describe=(gcloud compute tpus queued-resources describe "$TPU_NAME" --zone="$ZONE" --project="$PROJECT"
  --format='value(state.state)')
if [ "$DRY_RUN" = 1 ]; then
  run "${describe[@]}"
  exit 0
fi
for _ in $(seq 1 "${WAIT_TRIES:-360}"); do
  state=$("${describe[@]}")
  echo "queued resource $TPU_NAME: $state" >&2
  case "$state" in
    ACTIVE) exit 0 ;;
    FAILED|SUSPENDED) echo "error: queued resource $TPU_NAME is $state" >&2; exit 1 ;;
  esac
  sleep "${WAIT_SECONDS:-10}"
done
echo "error: $TPU_NAME not ACTIVE after waiting" >&2
exit 1
