#!/usr/bin/env bash
# Train on a SLURM GPU cluster: `sbatch` + `srun`, every process calling
# jax.distributed.initialize() (DASTC_DISTRIBUTED=1; JAX reads the SLURM
# environment to find its peers).
#
#   launch/slurm.sh [--dry-run] [--nodes=N] [--gpus-per-node=G] \
#       [--per=gpu|node] [--time=24:00:00] [--partition=P] -- \
#       --config=configs/viper.py --workdir=/nfs/runs/viper \
#       --config.train.batch_size=16
#
# --per=gpu (default) starts one process per GPU (each sees one GPU through
# CUDA_VISIBLE_DEVICES=$SLURM_LOCALID); --per=node starts one process per
# node that drives all its GPUs. --dry-run prints the batch script and the
# sbatch command instead of submitting. The workdir and data_dir must be on
# a shared file system. Install jax[cuda12]==0.10.2 in the job's Python.
# Preemption: SLURM sends SIGTERM 120 s before the time limit (or when it
# preempts the job); the run saves a checkpoint at the current step and exits
# with 75, and the script then requeues the job, which resumes from it.
set -euo pipefail
dry_run=0; nodes=1; gpus=8; per=gpu; time_limit=24:00:00; partition=""
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --nodes=*) nodes="${1#*=}" ;;
    --gpus-per-node=*) gpus="${1#*=}" ;;
    --per=*) per="${1#*=}" ;;
    --time=*) time_limit="${1#*=}" ;;
    --partition=*) partition="${1#*=}" ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
[[ "${1:-}" == "--" ]] && shift
if [[ "$per" != gpu && "$per" != node ]]; then
  echo "--per must be gpu or node" >&2; exit 2
fi
repo="$(cd "$(dirname "$0")/.." && pwd)"
tasks=$([[ "$per" == gpu ]] && echo "$gpus" || echo 1)
main_args=$(printf '%q ' "$@")
if [[ "$per" == gpu ]]; then
  bind='export CUDA_VISIBLE_DEVICES=$SLURM_LOCALID; '
else
  bind=''
fi
script="#!/usr/bin/env bash
#SBATCH --job-name=dastc_jax
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=$tasks
#SBATCH --gpus-per-node=$gpus
#SBATCH --cpus-per-task=$(( 16 / tasks > 0 ? 16 / tasks : 1 ))
#SBATCH --time=$time_limit
${partition:+#SBATCH --partition=$partition}
#SBATCH --output=slurm-%j.out
#SBATCH --signal=TERM@120
#SBATCH --requeue
set -uo pipefail
cd $repo
srun bash -c '${bind}DASTC_DISTRIBUTED=1 exec python -m dastc_jax.main $main_args'
rc=\$?
# 75 = preempted after saving a checkpoint: requeue; the rerun resumes.
if [[ \$rc -eq 75 ]]; then scontrol requeue \$SLURM_JOB_ID; exit 0; fi
exit \$rc
"
if [[ "$dry_run" == 1 ]]; then
  printf '%s\n' "$script"
  echo "sbatch <the script above>"
  exit 0
fi
printf '%s\n' "$script" | sbatch
