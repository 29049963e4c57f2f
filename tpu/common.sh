# shellcheck shell=bash
# Shared by the tpu/ scripts (sourced, not run): settings and a dry-run-aware runner.
# Every setting is an environment variable with a flag of the same name:
#   TPU_NAME (--name), ZONE (--zone), PROJECT (--project), ACCELERATOR (--accelerator),
#   RUNTIME (--runtime), SPOT (--spot / --no-spot), TFDS_DATA_DIR (--tfds-data-dir)
# and --dry-run prints each command instead of running it.

TPU_NAME=${TPU_NAME:-research-tpu}
ZONE=${ZONE:-us-central2-b}
PROJECT=${PROJECT:-}
ACCELERATOR=${ACCELERATOR:-v4-8}
RUNTIME=${RUNTIME:-}
SPOT=${SPOT:-1}
TFDS_DATA_DIR=${TFDS_DATA_DIR:-}
REMOTE_DIR=${REMOTE_DIR:-research}
DRY_RUN=${DRY_RUN:-0}
ARGS=()

parse_common() {
  while [ $# -gt 0 ]; do
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      --name) TPU_NAME=$2; shift ;;
      --zone) ZONE=$2; shift ;;
      --project) PROJECT=$2; shift ;;
      --accelerator) ACCELERATOR=$2; shift ;;
      --runtime) RUNTIME=$2; shift ;;
      --spot) SPOT=1 ;;
      --no-spot) SPOT=0 ;;
      --tfds-data-dir) TFDS_DATA_DIR=$2; shift ;;
      --) shift; ARGS+=("$@"); break ;;
      *) ARGS+=("$1") ;;
    esac
    shift
  done
  if [ -z "$PROJECT" ]; then
    PROJECT=$(gcloud config get-value project 2>/dev/null || true)
  fi
  if [ -z "$PROJECT" ]; then
    echo "error: set PROJECT or --project (or gcloud config set project ...)" >&2
    exit 2
  fi
  if [ -z "$RUNTIME" ]; then
    # The TPU VM base image per generation (see cloud.google.com/tpu/docs/runtimes).
    case "$ACCELERATOR" in
      v4-*) RUNTIME=tpu-ubuntu2204-base ;;
      v5litepod-*|v5e-*) RUNTIME=v2-alpha-tpuv5-lite ;;
      v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
      v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
      *) echo "error: no default runtime for $ACCELERATOR; pass --runtime" >&2; exit 2 ;;
    esac
  fi
}

# run CMD...: print it (dry run) or run it, echoing it to stderr either way.
run() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    printf '+ %s\n' "$*" >&2
    "$@"
  fi
}

tpu_ssh() {  # tpu_ssh COMMAND: run COMMAND on every worker of the TPU VM
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --worker=all --command="$1"
}
