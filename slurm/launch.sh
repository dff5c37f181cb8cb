#!/usr/bin/env bash
# Shared Slurm launcher for r1mega: run inside an sbatch allocation (a recipe in slurm/
# execs it) as
#
#   slurm/launch.sh CONFIG [key=value ...]
#
# It starts one `python -m r1mega.cli train CONFIG key=value...` per task with srun (one
# task per GPU; for CPU jobs one per node); every task finds its rank in SLURM_PROCID /
# SLURM_NTASKS / SLURM_LOCALID (parallel/layout.py: detect_distributed_env) and meets the
# others at MASTER_ADDR:MASTER_PORT, which this script derives from the allocation.
#
# Preemption and requeue (the contract with r1mega/preemption.py):
#   * SIGTERM or SIGUSR1 reaching a rank (a recipe's `--signal=USR1@N` warning before the
#     time limit, `scancel --signal=USR1`, or scheduler preemption) sets a flag; between
#     two steps all ranks agree on it, save a checkpoint, rank 0 writes the marker file
#     $R1MEGA_REQUEUE_MARKER and every rank exits with REQUEUE_EXIT_CODE=75 (EX_TEMPFAIL).
#   * This script then runs `scontrol requeue $SLURM_JOB_ID` (the job needs --requeue):
#     the same job id goes back to the queue and its next run resumes from the newest
#     checkpoint (r1mega resumes from checkpoint.save_dir by itself). Recipes use
#     `--open-mode=append` so the log of every run stays in one file.
#   * The marker, not srun's exit code alone, is the signal to requeue: with
#     --kill-on-bad-exit the first rank to exit 75 makes srun terminate the slower ranks
#     and srun then reports 143 (measured with Slurm 22.05), not 75.
#   * Only a saved checkpoint triggers a requeue, so a job that crashes at start-up is
#     never requeued in a loop; R1MEGA_MAX_REQUEUES caps the number of requeues anyway.
#   * Requeue fails (e.g. --no-requeue, or the cluster forbids it): the job exits 75 and
#     resubmitting the same recipe resumes from the checkpoint just the same.
#
# Knobs (environment, all optional):
#   R1MEGA_PYTHON            python executable on the nodes (default: python)
#   R1MEGA_CONTAINER_IMAGE   run the tasks in this container image (pyxis/enroot srun flags)
#   R1MEGA_CONTAINER_MOUNTS  extra pyxis mounts, "src:dst[,src:dst...]" (the repo is mounted)
#   R1MEGA_MASTER_ADDR / R1MEGA_MASTER_PORT   override the derived rendezvous address
#   R1MEGA_REQUEUE_MARKER    marker file (default: $SLURM_SUBMIT_DIR/logs/.requeue-<job id>;
#                            must be visible from the batch host and from rank 0's node)
#   R1MEGA_MAX_REQUEUES      give up requeueing after this many restarts (default 50)
#   R1MEGA_SRUN_ARGS         extra srun arguments (word-split), e.g. "--cpu-bind=none"
set -euo pipefail

readonly REQUEUE_EXIT_CODE=75  # r1mega.preemption.REQUEUE_EXIT_CODE

log() { echo "[r1mega launch] $*"; }
die() { echo "[r1mega launch] error: $*" >&2; exit 2; }

[[ $# -ge 1 ]] || die "usage: $0 CONFIG [key=value ...] (inside an sbatch allocation)"
[[ -n ${SLURM_JOB_ID:-} ]] || die "not inside a Slurm allocation: submit a recipe with \
sbatch (e.g. sbatch slurm/r1_zero_tiny.sh), or run \`r1mega train\` directly"
command -v srun >/dev/null || die "srun not found on the batch host"

R1MEGA_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export R1MEGA_ROOT
config=$1
shift
# Absolute, because the tasks run in the repository root (and, with a container, see
# the repository at the same path) whatever directory the job was submitted from.
if [[ -f $config ]]; then
  config=$(realpath "$config")
elif [[ -f $R1MEGA_ROOT/$config ]]; then
  config=$R1MEGA_ROOT/$config
else
  die "config file not found: $config"
fi

# --- Rendezvous -----------------------------------------------------------------------
# Rank 0 (SLURM_PROCID 0) runs on the first node of the allocation (srun's default block
# distribution) and hosts torch.distributed's TCP store there.
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
[[ -n $first_node ]] || die "cannot expand SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}'"
if [[ -n ${R1MEGA_MASTER_ADDR:-} ]]; then
  master_addr=$R1MEGA_MASTER_ADDR
elif getent hosts "$first_node" >/dev/null 2>&1; then
  master_addr=$first_node
else
  # Node names need not resolve (NodeAddr/NodeHostname differ from NodeName, or emulated
  # nodes): ask the controller for the address it uses to reach that node.
  master_addr=$(scontrol show node "$first_node" -o | tr ' ' '\n' | sed -n 's/^NodeAddr=//p')
  [[ -n $master_addr ]] || die "node $first_node does not resolve and has no NodeAddr"
fi
export MASTER_ADDR=$master_addr
# A port per job: concurrent jobs sharing a node (non-exclusive allocations, requeues that
# land next to a finishing job) must not collide; torch's default 29500 would.
export MASTER_PORT=${R1MEGA_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

# --- Environment for large Megatron-Core jobs (each overridable from the caller) -------
# Megatron's tensor/sequence-parallel communication overlap relies on kernels reaching the
# GPU in issue order: one hardware work queue per device.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# InfiniBand retry timeout 4.096us * 2^22 ~ 17 s: rides out link flaps and congestion on a
# 512-GPU fabric instead of failing the job (NCCL's default 20 gives ~4 s).
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
# NVLink SHARP reserves GiBs of GPU memory per communicator, and MoE layouts create many
# (TP, EP, expert-DP, PP groups for two layouts): keep that memory for the model.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
# A failed or timed-out collective aborts the process, so srun --kill-on-bad-exit ends
# the job instead of every other rank hanging on the dead one until the wall time.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# Free NCCL buffers when the collective finishes instead of extending tensor lifetimes
# through record_stream: lower peak memory on the big all-to-all / all-gather buffers.
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
# On a collective timeout, dump NCCL's flight recorder (last collectives per rank) so a
# hang can be attributed to a rank and an op.
# (torch 2.14 name; it warns that the older TORCH_NCCL_TRACE_BUFFER_SIZE is deprecated)
export TORCH_FR_BUFFER_SIZE=${TORCH_FR_BUFFER_SIZE:-2000}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
# Warnings only: INFO from 512 ranks buries the training log.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# RL sequences vary in length step to step; expandable segments avoid the fragmentation
# that otherwise turns into OOMs hours into a run.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# Transformer Engine: cuDNN fused attention handles MLA's unequal q/k (192) and v (128)
# head dims, which the flash-attention backend does not.
export NVTE_FUSED_ATTN=${NVTE_FUSED_ATTN:-1}
# Leave SMs free for communication kernels that overlap TE's LayerNorm/RMSNorm kernels.
export NVTE_FWD_LAYERNORM_SM_MARGIN=${NVTE_FWD_LAYERNORM_SM_MARGIN:-16}
export NVTE_BWD_LAYERNORM_SM_MARGIN=${NVTE_BWD_LAYERNORM_SM_MARGIN:-16}
# One OpenMP thread per CPU given to the task: 8 ranks per node each spawning one thread
# per core oversubscribe the node's CPUs.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# Progress lines must reach the job log as they happen, not when a buffer fills.
export PYTHONUNBUFFERED=1

marker=${R1MEGA_REQUEUE_MARKER:-${SLURM_SUBMIT_DIR:-$PWD}/logs/.requeue-${SLURM_JOB_ID}}
export R1MEGA_REQUEUE_MARKER=$marker
mkdir -p "$(dirname "$marker")"
rm -f "$marker"

# --- srun ------------------------------------------------------------------------------
python_bin=${R1MEGA_PYTHON:-python}
srun_args=(
  --kill-on-bad-exit=1  # one dead rank ends the step instead of a hang
  --chdir="$R1MEGA_ROOT"
)
# No --gpus-per-task / --gpu-bind: every rank sees all GPUs of its node and picks
# LOCAL_RANK's (torch.cuda.set_device), which keeps CUDA IPC / NVLink P2P between the
# ranks of a node working.
if [[ -n ${R1MEGA_CONTAINER_IMAGE:-} ]]; then
  mounts="$R1MEGA_ROOT:$R1MEGA_ROOT${R1MEGA_CONTAINER_MOUNTS:+,$R1MEGA_CONTAINER_MOUNTS}"
  srun_args+=(
    --container-image="$R1MEGA_CONTAINER_IMAGE"
    --container-mounts="$mounts"
    --container-workdir="$R1MEGA_ROOT"
    --no-container-mount-home
  )
fi
if [[ -n ${R1MEGA_SRUN_ARGS:-} ]]; then
  read -r -a extra_srun <<<"$R1MEGA_SRUN_ARGS"
  srun_args+=("${extra_srun[@]}")
fi

log "job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-?}) run $((${SLURM_RESTART_COUNT:-0} + 1)):" \
  "${SLURM_NTASKS:-?} tasks on ${SLURM_JOB_NUM_NODES:-?} node(s) ${SLURM_JOB_NODELIST};" \
  "rendezvous ${MASTER_ADDR}:${MASTER_PORT}; config ${config} $*"

# Each task announces itself (rank, node) before exec'ing python, so the log shows where
# every rank ran; exec keeps python as the process that receives Slurm's signals.
# shellcheck disable=SC2016  # expanded by the task's shell, not here
task_script='echo "[r1mega launch] rank ${SLURM_PROCID}/${SLURM_NTASKS} on node \
${SLURMD_NODENAME:-$(hostname)} (local rank ${SLURM_LOCALID})"; exec "$@"'
set +e
srun "${srun_args[@]}" bash -c "$task_script" r1mega-task \
  "$python_bin" -m r1mega.cli train "$config" "$@"
rc=$?
set -e

if [[ $rc -ne 0 && ( $rc -eq $REQUEUE_EXIT_CODE || -f $marker ) ]]; then
  rm -f "$marker"
  restarts=${SLURM_RESTART_COUNT:-0}
  if [[ $restarts -ge ${R1MEGA_MAX_REQUEUES:-50} ]]; then
    log "preempted after a checkpoint, but already requeued $restarts times: not again"
    exit "$REQUEUE_EXIT_CODE"
  fi
  log "preempted after a checkpoint (srun exit $rc): requeueing job ${SLURM_JOB_ID}"
  if scontrol requeue "$SLURM_JOB_ID"; then
    exit 0  # Slurm ends this run now; the job restarts later under the same id
  fi
  log "scontrol requeue failed: resubmit the recipe to resume from the checkpoint"
  exit "$REQUEUE_EXIT_CODE"
fi
rm -f "$marker"
if [[ $rc -ne 0 ]]; then
  log "training failed: srun exit $rc"
fi
exit "$rc"
