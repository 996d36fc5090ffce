#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: one process per TPU VM host, all hosts
# started together with `gcloud compute tpus tpu-vm ssh --worker=all`, each
# calling jax.distributed.initialize() (DASTC_DISTRIBUTED=1; on TPU VMs the
# peers are found automatically).
#
#   launch/tpu_pod.sh [--dry-run] [--setup] TPU_NAME ZONE -- \
#       --config=configs/viper.py --workdir=gs://BUCKET/runs/viper \
#       --config.data.data_dir=gs://BUCKET/tfds --config.train.batch_size=32
#
# --setup first copies this repository to every host (~/dastc_jax) and
# installs the pinned requirements with the TPU build of jax. --dry-run
# prints the gcloud commands instead of running them. The workdir and the
# prepared data must be reachable from every host (a GCS bucket or a shared
# disk). Set PROJECT to pass --project.
set -euo pipefail
dry_run=0
setup=0
while [[ $# -gt 0 && "$1" == --* && "$1" != "--" ]]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --setup) setup=1 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if [[ $# -lt 3 || "$3" != "--" ]]; then
  echo "usage: $0 [--dry-run] [--setup] TPU_NAME ZONE -- MAIN_FLAGS..." >&2
  exit 2
fi
tpu="$1"; zone="$2"; shift 3
cd "$(dirname "$0")/.."
gcloud_args=(--zone="$zone" --worker=all)
if [[ -n "${PROJECT:-}" ]]; then gcloud_args+=(--project="$PROJECT"); fi
main_args=$(printf '%q ' "$@")
run() {
  if [[ "$dry_run" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}
if [[ "$setup" == 1 ]]; then
  run gcloud compute tpus tpu-vm scp --recurse "$(pwd)" "$tpu:~/dastc_jax" \
      "${gcloud_args[@]}"
  run gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_args[@]}" \
      --command="cd ~/dastc_jax && python3 -m pip install -r requirements.txt 'jax[tpu]==0.10.2'"
fi
run gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_args[@]}" \
    --command="cd ~/dastc_jax && DASTC_DISTRIBUTED=1 python3 -m dastc_jax.main $main_args"
