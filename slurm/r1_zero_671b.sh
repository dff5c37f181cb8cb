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
# plus the checkpoint write: `r1mega plan` puts a worst-case step (32K-token rollouts) at
# ~16 min and the checkpoint at ~8.7 TiB, so 300 s would lose the step and everything
# since the last periodic checkpoint (save_interval 100). 1800 s covers both; lower it
# to measured step + save times (`sbatch --signal=USR1@N` on the command line overrides).
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
