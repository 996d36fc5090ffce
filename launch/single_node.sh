#!/usr/bin/env bash
# One process driving every accelerator of one machine (data-parallel mesh
# over all local GPUs/TPU cores; the global batch is split across them).
#
#   launch/single_node.sh [--dry-run] --config=configs/viper.py \
#       --workdir=runs/viper [--config.train.batch_size=8 ...]
#
# --dry-run prints the command instead of running it. Install the
# accelerator build of jax first, e.g. pip install "jax[cuda12]==0.10.2".
set -euo pipefail
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run=1
  shift
fi
cd "$(dirname "$0")/.."
cmd=(python -m dastc_jax.main "$@")
if [[ "$dry_run" == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
