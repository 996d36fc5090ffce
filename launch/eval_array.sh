#!/usr/bin/env bash
# Evaluate every checkpoint of a training run as a SLURM job array: one
# array task per checkpoint step, each running
# `python -m dastc_jax.main --mode=eval --checkpoint=STEP` on one GPU (its
# tables and TensorBoard scalars go to WORKDIR/eval/step_STEP/). Afterwards,
# `python -m dastc_jax.main --mode=eval --checkpoint=WORKDIR ...` reuses those
# tables and writes WORKDIR/eval/summary.md (last and best-on-val mIoU).
#
#   launch/eval_array.sh [--dry-run] [--partition=P] -- \
#       --config=configs/viper.py --workdir=/nfs/runs/viper
#
# --dry-run prints the steps found, the batch script and the sbatch command.
set -euo pipefail
dry_run=0; partition=""
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --partition=*) partition="${1#*=}" ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
[[ "${1:-}" == "--" ]] && shift
workdir=""
for a in "$@"; do
  [[ "$a" == --workdir=* ]] && workdir="${a#*=}"
done
if [[ -z "$workdir" ]]; then echo "--workdir=... is required" >&2; exit 2; fi
# Committed orbax checkpoints are folders named by their step.
mapfile -t steps < <(find "$workdir/checkpoints" -mindepth 1 -maxdepth 1 \
    -type d -regex '.*/[0-9]+' -printf '%f\n' 2>/dev/null | sort -n)
if [[ ${#steps[@]} -eq 0 ]]; then
  echo "no checkpoints in $workdir/checkpoints" >&2; exit 1
fi
repo="$(cd "$(dirname "$0")/.." && pwd)"
main_args=$(printf '%q ' "$@")
script="#!/usr/bin/env bash
#SBATCH --job-name=dastc_eval
#SBATCH --array=0-$(( ${#steps[@]} - 1 ))
#SBATCH --ntasks=1
#SBATCH --gpus=1
${partition:+#SBATCH --partition=$partition}
#SBATCH --output=slurm-eval-%A_%a.out
set -euo pipefail
steps=(${steps[*]})
cd $repo
exec python -m dastc_jax.main --mode=eval --checkpoint=\${steps[\$SLURM_ARRAY_TASK_ID]} $main_args
"
if [[ "$dry_run" == 1 ]]; then
  echo "checkpoint steps: ${steps[*]}"
  printf '%s\n' "$script"
  echo "sbatch <the script above>"
  exit 0
fi
printf '%s\n' "$script" | sbatch
