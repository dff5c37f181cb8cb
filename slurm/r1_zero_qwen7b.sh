#!/usr/bin/env bash
# R1-Zero-style GRPO on Qwen2.5-7B (base) on one node of 8 GPUs (TP 4 x DP 2).
#
#   mkdir -p logs && sbatch [-p PARTITION -A ACCOUNT] slurm/r1_zero_qwen7b.sh [key=value ...]
#
# Submit from the repository root (or set R1MEGA_ROOT). Preemption and requeue as in
# slurm/launch.sh: USR1 before the time limit -> checkpoint -> exit 75 -> requeue.
#SBATCH --job-name=r1-zero-qwen7b
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
root=${R1MEGA_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
[[ -x $root/slurm/launch.sh ]] || {
  echo "slurm/launch.sh not found under $root: submit from the repository root" >&2
  exit 2
}
exec "$root/slurm/launch.sh" configs/qwen2_5_7b.yaml "$@"
