"""Parallel layouts and the process groups behind them.

A :class:`Layout` is the resolved form of a ``LayoutConfig`` for a given world size: the
tensor (TP), pipeline (PP), context (CP), expert (EP), expert-tensor (ETP) and data (DP)
parallel sizes. :func:`initialize_layout` creates the process groups through
megatron-core's ``parallel_state`` (the only global state the project keeps), on
gloo for CPU or NCCL for GPU, after :func:`init_distributed` has joined the job from
whatever launched it (torchrun, Slurm's srun, or a single plain process).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from parallel.platform import apply_cpu_platform, default_backend, gpu_available


@dataclass(frozen=True)
class Layout:
    """Parallel sizes of one layout for a fixed world size (DP is derived)."""

    world_size: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int = 1
    sequence_parallel: bool = False
    pp_layers: tuple[int, ...] | None = None

    @property
    def dp(self) -> int:
        """Data-parallel size of the dense (non-expert) parameters."""
        return self.world_size // (self.tp * self.pp * self.cp)

    @property
    def expert_dp(self) -> int:
        """Data-parallel size of the expert parameters."""
        return self.world_size // (self.etp * self.ep * self.pp)

    @classmethod
    def from_config(cls, layout_cfg: Any, world_size: int, name: str = "train_layout") -> Layout:
        """Resolve a ``LayoutConfig`` for ``world_size``, checking it divides evenly."""
        pp_layers = tuple(layout_cfg.pp_layers) if layout_cfg.pp_layers is not None else None
        layout = cls(world_size=world_size, tp=layout_cfg.tp, pp=layout_cfg.pp, cp=layout_cfg.cp,
                     ep=layout_cfg.ep, etp=layout_cfg.etp,
                     sequence_parallel=layout_cfg.sequence_parallel, pp_layers=pp_layers)
        model_parallel = layout.tp * layout.pp * layout.cp
        if world_size % model_parallel:
            raise ValueError(
                f"{name}: world size {world_size} is not divisible by "
                f"tp*pp*cp = {layout.tp}*{layout.pp}*{layout.cp} = {model_parallel}"
            )
        expert_parallel = layout.etp * layout.ep * layout.pp
        if world_size % expert_parallel:
            raise ValueError(
                f"{name}: world size {world_size} is not divisible by "
                f"etp*ep*pp = {layout.etp}*{layout.ep}*{layout.pp} = {expert_parallel}"
            )
        return layout

    def describe(self) -> str:
        return (f"TP={self.tp} PP={self.pp} CP={self.cp} EP={self.ep} ETP={self.etp} "
                f"DP={self.dp} (world {self.world_size})")


@dataclass(frozen=True)
class DistributedEnv:
    """Where this process sits in the job, as told by its launcher."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | slurm | single


def detect_distributed_env(default_port: int = 29500) -> DistributedEnv:
    """Read rank and rendezvous from torchrun's or Slurm's environment.

    torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. Under ``srun`` each
    task has SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; MASTER_ADDR/PORT come from the
    launcher script (derived from the allocation). Anything else is a single process.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistributedEnv(
            rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", default_port)), launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        if "MASTER_ADDR" not in env:
            raise RuntimeError(
                "running under srun without MASTER_ADDR: launch through slurm/launch.sh, "
                "which derives MASTER_ADDR/MASTER_PORT from the allocation"
            )
        return DistributedEnv(
            rank=int(env["SLURM_PROCID"]), world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)), master_addr=env["MASTER_ADDR"],
            master_port=int(env.get("MASTER_PORT", default_port)), launcher="slurm",
        )
    # A lone process rendezvous with itself: any free port, so that concurrent single
    # process jobs (tools, tests) never collide on the default one.
    port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else _free_port()
    return DistributedEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1",
                          master_port=port, launcher="single")


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(timeout_minutes: int = 30, default_port: int = 29500) -> DistributedEnv:
    """Join the job's default process group (idempotent); returns where we are."""
    env = detect_distributed_env(default_port)
    apply_cpu_platform()
    if dist.is_initialized():
        return env
    if gpu_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    dist.init_process_group(
        backend=default_backend(),
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank, world_size=env.world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    return env


def initialize_layout(layout: Layout) -> None:
    """Create megatron-core's process groups for ``layout`` (replacing any previous ones)."""
    from megatron.core import parallel_state

    if dist.get_world_size() != layout.world_size:
        raise ValueError(
            f"layout is for {layout.world_size} processes but the job has {dist.get_world_size()}"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        create_gloo_process_groups=True,
    )


def destroy_layout() -> None:
    """Tear down megatron-core's process groups (the default group stays)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


def context_parallel_positions(seq_length: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """Positions of a ``seq_length`` sequence held by context-parallel rank ``cp_rank``.

    megatron-core's load-balanced layout: the sequence is cut into ``2 * cp_size`` equal
    chunks and rank ``r`` holds chunks ``r`` and ``2 * cp_size - 1 - r`` (under causal
    attention an early chunk is cheap and a late one expensive, so every rank gets one of
    each), in that order.
    """
    if cp_size < 1 or not 0 <= cp_rank < cp_size or seq_length % (2 * cp_size):
        raise ValueError(f"sequence length {seq_length} does not split into 2 * cp = "
                         f"{2 * cp_size} chunks for CP rank {cp_rank}")
    chunk = seq_length // (2 * cp_size)
    last = 2 * cp_size - 1 - cp_rank
    return torch.cat([torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk),
                      torch.arange(last * chunk, (last + 1) * chunk)])


def rank_coordinates() -> dict[str, int]:
    """This rank's coordinates in every parallel dimension (for logs and file names)."""
    from megatron.core import parallel_state as ps

    return {
        "rank": dist.get_rank(),
        "tp": ps.get_tensor_model_parallel_rank(),
        "pp": ps.get_pipeline_model_parallel_rank(),
        "cp": ps.get_context_parallel_rank(),
        "ep": ps.get_expert_model_parallel_rank(),
        "dp": ps.get_data_parallel_rank(),
    }
