#!/usr/bin/env bash
# The tiny DeepSeek-V3-shaped CPU job on 2 nodes x 1 task (gloo): a smoke test of the
# Slurm path (rendezvous across nodes, srun ranks, preemption and requeue) in seconds.
#
#   mkdir -p logs && sbatch slurm/r1_zero_tiny.sh [key=value ...]
#
# World size 2 = configs/tiny_cpu.yaml's layouts (train PP 2, generation TP 2 x EP 2).
# tests/test_slurm.py runs it on a throw-away two-node cluster.
#SBATCH --job-name=r1-zero-tiny
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --signal=USR1@60
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
root=${R1MEGA_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
[[ -x $root/slurm/launch.sh ]] || {
  echo "slurm/launch.sh not found under $root: submit from the repository root" >&2
  exit 2
}
exec "$root/slurm/launch.sh" configs/tiny_cpu.yaml "$@"
