#!/usr/bin/env bash
# Keep a spot TPU run alive: when the queued resource is preempted or fails, delete it,
# create it again, set it up and relaunch the same command (which resumes from its workdir).
#   tpu/babysit.sh --name my-tpu [--once] [--dry-run] -- <research.main arguments>
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
once=0
pass=()
for a in "$@"; do
  if [ "$a" = --once ]; then once=1; else pass+=("$a"); fi
done
# shellcheck source=tpu/common.sh
. "$here/common.sh"
parse_common "${pass[@]}"

common=(--name "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" --accelerator "$ACCELERATOR" --runtime "$RUNTIME")
[ "$SPOT" = 1 ] || common+=(--no-spot)
[ -n "$TFDS_DATA_DIR" ] && common+=(--tfds-data-dir "$TFDS_DATA_DIR")
[ "$DRY_RUN" = 1 ] && common+=(--dry-run)

while true; do
  state=$(gcloud compute tpus queued-resources describe "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
    --format='value(state.state)' 2>/dev/null || echo MISSING)
  echo "$(date -u +%FT%TZ) $TPU_NAME: $state" >&2
  case "$state" in
    ACTIVE|WAITING_FOR_RESOURCES|PROVISIONING|CREATING|ACCEPTED) ;;
    *)
      [ "$state" = MISSING ] || run gcloud compute tpus queued-resources delete "$TPU_NAME" --zone="$ZONE" \
        --project="$PROJECT" --force --quiet
      "$here/create.sh" "${common[@]}"
      "$here/setup.sh" "${common[@]}"
      "$here/run.sh" "${common[@]}" -- "${ARGS[@]}"
      ;;
  esac
  [ "$once" = 1 ] && break
  sleep "${BABYSIT_SECONDS:-300}"
done
