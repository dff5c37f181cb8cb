"""Training checkpoints: model, optimizer, LR schedule, RNG and data position.

Layout on disk (one directory per saved step under ``checkpoint.save_dir``)::

    step_00000012/            a megatron-core distributed checkpoint (torch_dist)
        r1mega_meta.json      written last: its presence marks the checkpoint complete
    latest                    text file naming the newest complete step directory

A checkpoint is written into ``step_XXXXXXXX.partial`` and renamed only after every rank
has finished writing, then ``latest`` is replaced atomically; a job killed mid-save
leaves a ``.partial`` directory that :func:`find_latest_checkpoint` never picks. The
names of this layout, and finding a run's newest step, live in the torch-free
:mod:`r1mega.checkpointing.paths` (re-exported here). Every file is fsynced and recorded
(size, CRC-32) in a manifest before the marker is written; a restarted job checks the
newest checkpoint against it, and sets a corrupt one aside and falls back to the next
older one (:func:`load_latest_checkpoint`; see :mod:`r1mega.checkpointing.integrity`).

The model and optimizer states are sharded tensors. The LR scheduler and
the trainer's own state (step, data sampler position) are identical on all ranks and
saved once; each rank's RNG states are saved as per-rank objects.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from r1mega.checkpointing.integrity import (
    fsync_path,
    owned_files,
    read_meta,
    seal_checkpoint,
    set_aside,
    sync_and_record,
    verify_checkpoint,
)
from r1mega.checkpointing.model_io import model_sharded_state_dict
from r1mega.checkpointing.paths import (
    CONFIG,
    LATEST,
    META,
    REPLACED,
    complete_steps,
    find_latest_checkpoint,
    step_dir,
)
from r1mega.logging_utils import print_rank0
from r1mega.training.policy import Policy
from r1mega.utils.process import die_with_parent

__all__ = ["CONFIG", "LATEST", "META", "find_latest_checkpoint", "load_checkpoint",
           "load_latest_checkpoint", "save_checkpoint", "step_dir"]

# Each rank writes its own optimizer-state buckets in parallel, no gather (megatron-core
# 0.19.2 refuses the parameter-space format for flattened shards). Optimizer state then
# reloads at the same TP/PP/EP layout (any DP for the model); weights load at any layout.
_OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _rng_sharded_object(is_loading: bool) -> Any:
    """This rank's RNG states as a ShardedObject keyed by global rank."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    rank, world = dist.get_rank(), dist.get_world_size()
    state = None if is_loading else {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def _sharded_state(policy: Policy, optimizer: Any, is_loading: bool) -> dict[str, Any]:
    model_state = model_sharded_state_dict(policy.chunks)
    return {
        "model": model_state,
        "optimizer": optimizer.sharded_state_dict(model_state, is_loading=is_loading,
                                                  metadata=_OPTIM_METADATA),
        "rng": _rng_sharded_object(is_loading),
    }


def _results_queue_dies_with_trainer() -> None:
    """megatron-core's checkpoint writer collects results through a queue served by a
    ``multiprocessing`` manager process it starts on first save; that process would
    survive a SIGKILLed trainer. Start the manager ourselves with
    :func:`~r1mega.utils.process.die_with_parent` as its initializer."""
    import multiprocessing
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        manager.start(initializer=die_with_parent)
        filesystem_async._results_queue = manager.Queue()
        _MANAGERS.append(manager)  # keep it alive for the process lifetime


_MANAGERS: list = []


def save_checkpoint(root: str | Path, step: int, policy: Policy, optimizer: Any,
                    scheduler: Any, trainer_state: dict[str, Any], keep_last: int = 0,
                    config: Any = None, reference: Any = None) -> Path:
    """Collectively save everything needed to resume after ``step``; returns its path.

    ``config`` (the job's resolved config) is stored beside the weights, so tools such as
    `r1mega eval CHECKPOINT` can rebuild the model from the checkpoint alone.
    ``reference`` (RL's :class:`~r1mega.training.reference.ReferencePolicy`) is saved in
    the same checkpoint (``reference.*`` keys)."""
    from megatron.core import dist_checkpointing

    final = step_dir(root, step)
    partial = final.with_name(final.name + ".partial")
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    _results_queue_dies_with_trainer()
    state = _sharded_state(policy, optimizer, is_loading=False)
    state["scheduler"] = scheduler.state_dict()
    state["trainer"] = trainer_state
    state["adam_step"] = _adam_step(optimizer)
    # --- the RL reference policy (r1mega.training.reference) ---
    state["has_reference"] = reference is not None
    if reference is not None:
        state["reference"] = reference.sharded_state_dict(policy)
    # ---
    dist_checkpointing.save(state, str(partial))
    dist.barrier()
    rank = dist.get_rank()
    if rank == 0 and config is not None:
        from omegaconf import OmegaConf

        (partial / CONFIG).write_text(OmegaConf.to_yaml(config))
    # Each rank makes its own files durable and records them (on a shared filesystem only
    # the writer's fsync flushes its data); rank 0 seals the manifest and the marker.
    records = sync_and_record(owned_files(partial, rank))
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    if rank == 0:
        seal_checkpoint(partial, step, dist.get_world_size(),
                        {name: rec for part in gathered for name, rec in part.items()})
        _publish(partial, final)
        tmp = Path(root) / (LATEST + ".tmp")
        tmp.write_text(final.name)
        fsync_path(tmp)
        os.replace(tmp, Path(root) / LATEST)
        fsync_path(Path(root))
        _prune(Path(root), keep_last)
    dist.barrier()
    return final


def _publish(partial: Path, final: Path) -> None:
    """Give the sealed ``partial`` its final name. An existing checkpoint of the same step
    is renamed aside first and deleted only afterwards, so a complete copy of the step
    exists at every instant (:func:`complete_steps` recognises ``.replaced``)."""
    replaced = final.with_name(final.name + REPLACED)
    if final.exists():
        shutil.rmtree(replaced, ignore_errors=True)  # stale: final is the complete copy
        os.rename(final, replaced)
    os.rename(partial, final)
    fsync_path(final.parent)
    shutil.rmtree(replaced, ignore_errors=True)


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for old in complete_steps(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _verified(path: Path) -> list[str]:
    """Problems with ``path`` found by all ranks together (each reads a share)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = verify_checkpoint(path, rank, world)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    return [p for part in gathered for p in part]


def load_latest_checkpoint(root: str | Path | None, policy: Policy, optimizer: Any,
                           scheduler: Any, reference: Any = None
                           ) -> tuple[Path, dict[str, Any]] | None:
    """Collectively restore the newest intact checkpoint under ``root``; returns its path
    and the trainer state, or None when there is none. ``reference`` as for
    :func:`load_checkpoint`.

    A checkpoint that fails its integrity check (a truncated or altered shard, a missing
    or malformed marker or manifest) is reported, set aside as ``step_N.corrupt`` and the
    next older complete one is tried. Errors of the load itself (a layout the optimizer
    state cannot take, a bug) are not corruption and propagate."""
    while True:
        holder = [None]
        if dist.get_rank() == 0:
            latest = find_latest_checkpoint(root)
            holder[0] = str(latest) if latest is not None else None
        dist.broadcast_object_list(holder, src=0)
        if holder[0] is None:
            return None
        path = Path(holder[0])
        problems = _verified(path)
        if not problems:
            return path, load_checkpoint(path, policy, optimizer, scheduler, reference)
        if dist.get_rank() == 0:
            moved = set_aside(path)
            shown = "; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more"
                                                if len(problems) > 5 else "")
            print_rank0(f"[r1mega] checkpoint {path} is corrupt ({shown}): set aside as "
                        f"{moved.name}; trying the next older one")
        dist.barrier()


def _init_empty_adam_state(optimizer: Any) -> None:
    """Give a fresh optimizer the Adam state a checkpoint will overwrite.

    Without Apex/Transformer Engine (CPU, or a GPU install without TE) megatron-core falls
    back to torch's Adam, whose per-parameter ``step`` only exists after a first update;
    ``DistributedOptimizer.state_dict()`` asserts on it, so a just-built optimizer cannot
    describe the state to load. Zero moments and step 0 are exactly torch's initial state.
    """
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    for sub in chained:
        inner = getattr(sub, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p]["step"] = torch.tensor(0.0)
                    inner.state[p]["exp_avg"] = torch.zeros_like(p)
                    inner.state[p]["exp_avg_sq"] = torch.zeros_like(p)


def _torch_adam_states(optimizer: Any) -> list[dict[str, Any]]:
    """Per-parameter states of the torch optimizers inside a megatron optimizer."""
    states = []
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            states.extend(inner.state.values())
    return states


def _adam_step(optimizer: Any) -> float | None:
    steps = {float(s["step"]) for s in _torch_adam_states(optimizer)
             if isinstance(s.get("step"), torch.Tensor)}
    return max(steps) if steps else None


def _restore_adam_steps(optimizer: Any, step: float | None) -> None:
    """Put back torch Adam's per-parameter ``step`` after a load.

    megatron-core 0.19.2's ``DistributedOptimizer`` on the torch-Adam fallback (no
    Apex/TE: CPU, or a GPU install without TE) neither restores the saved step (the
    fresh optimizer's value survives) nor keeps the counters separate (one tensor is
    shared by every parameter, and torch increments each parameter's step in place).
    Either would silently change Adam's bias correction after a resume, so the step is
    saved by the trainer and written back here, one tensor per parameter.
    """
    if step is None:
        return
    for state in _torch_adam_states(optimizer):
        if "step" in state:
            state["step"] = torch.tensor(step, dtype=torch.float32)


def load_checkpoint(path: str | Path, policy: Policy, optimizer: Any,
                    scheduler: Any, reference: Any = None) -> dict[str, Any]:
    """Collectively restore a checkpoint saved by :func:`save_checkpoint` (at any
    layout); returns the trainer state (step, data position ...). With ``reference``
    (RL), the checkpoint's reference policy is restored into it; a checkpoint saved
    without one is refused."""
    from megatron.core import dist_checkpointing
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    _init_empty_adam_state(optimizer)
    state = _sharded_state(policy, optimizer, is_loading=True)
    # --- the RL reference policy (r1mega.training.reference) ---
    if reference is not None:
        if not dist_checkpointing.load_common_state_dict(str(path)).get("has_reference"):
            raise ValueError(
                f"{path} holds no reference policy (saved by a run without one, e.g. "
                "grpo.kl_coef=0): its reference cannot be restored; resume with "
                "grpo.kl_coef=0 or start a new checkpoint.save_dir")
        state["reference"] = reference.sharded_state_dict(policy)
    # ---
    saved_world = read_meta(Path(path))["world_size"]
    if saved_world != dist.get_world_size():
        state.pop("rng")  # per-rank RNG streams only carry over to the same world size
    loaded = dist_checkpointing.load(state, str(path))
    chunks = policy.unwrapped()
    if len(chunks) == 1:
        chunks[0].load_state_dict(loaded["model"])
    else:
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(loaded["model"][f"model{i}"])
    # With fp32 parameters the distributed optimizer's main params are views of the model
    # parameters themselves (leaves that require grad): restore them without autograd.
    with torch.no_grad():
        optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_steps(optimizer, loaded.get("adam_step"))
    if reference is not None:
        reference.load_state_dict(policy, loaded["reference"])
    scheduler.load_state_dict(loaded["scheduler"])
    rng = loaded.get("rng")
    if isinstance(rng, dict):
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        get_cuda_rng_tracker().set_states(rng["tracker"])
    return dict(loaded["trainer"])
