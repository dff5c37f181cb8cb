#!/usr/bin/env bash
# DeepSeek-R1-Zero: GRPO on DeepSeek-V3-Base (671B) on 64 nodes x 8 H100 80GB = 512 ranks.
#
#   mkdir -p logs && sbatch [-p PARTITION -A ACCOUNT] slurm/r1_zero_671b.sh [key=value ...]
#
# Submit from the repository root (or set R1MEGA_ROOT); overrides go to `r1mega train`,
# e.g. `checkpoint.load=/ckpt/dsv3-base-dist`. `r1mega plan configs/r1_zero_671b.yaml`
# prints the per-GPU memory and step time of the layouts this runs.
#
# Preemption: USR1 before the time limit (or `scancel --signal=USR1`) makes the ranks
# finish the step in flight, checkpoint and exit 75; slurm/launch.sh then requeues the
# job, which resumes from that checkpoint. The lead time must cover the rest of a step
# plus the checkpoint write (~8.7 TiB). A step is R1's rollout of 8,192 outputs and its
# 16 updates: `r1mega plan` bounds it at ~4.3 h with 32K-token responses and ~10 h in the
# 65K phase (every response at the budget; typical steps are shorter), so a signal that
# comes later than that before the limit loses the step in flight and falls back to the
# last checkpoint (save_interval 5). Set --time and USR1@N from measured step + save
# times (`sbatch --time=... --signal=USR1@N` on the command line overrides these).
#SBATCH --job-name=r1-zero-671b
#SBATCH --nodes=64
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@1800
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
root=${R1MEGA_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
[[ -x $root/slurm/launch.sh ]] || {
  echo "slurm/launch.sh not found under $root: submit from the repository root" >&2
  exit 2
}
exec "$root/slurm/launch.sh" configs/r1_zero_671b.yaml "$@"
