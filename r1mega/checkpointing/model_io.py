"""Save and load model weights as megatron-core distributed checkpoints.

A distributed checkpoint stores every tensor under a global key with its global shape,
so a checkpoint written at one layout (TP/PP/EP/DP) loads at any other: each rank reads
exactly the slices its ``sharded_state_dict`` asks for. This is how converted Hugging
Face weights enter the trainer, and how tests give every layout the same weights. Which
directory a user's path means is :mod:`r1mega.checkpointing.paths`' business.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch


def model_sharded_state_dict(chunks: Iterable[torch.nn.Module]) -> dict[str, Any]:
    """The sharded state dict of this rank's model chunks (DDP wrappers are unwrapped)."""
    chunks = list(chunks)
    if len(chunks) != 1:
        sharded: dict[str, Any] = {}
        for i, chunk in enumerate(chunks):
            sharded[f"model{i}"] = _bare(chunk).sharded_state_dict()
        return sharded
    return _bare(chunks[0]).sharded_state_dict()


def _bare(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)


def save_model(chunks: Iterable[torch.nn.Module], directory: str) -> None:
    """Write this job's model weights (all ranks call this collectively)."""
    from megatron.core import dist_checkpointing

    os.makedirs(directory, exist_ok=True)
    dist_checkpointing.save(model_sharded_state_dict(chunks), directory)


def load_model(chunks: Iterable[torch.nn.Module], directory: str, strict: bool = True) -> None:
    """Load weights saved at any layout into this rank's chunks (collective), from a
    weights-only checkpoint or a full training checkpoint."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    chunks = list(chunks)
    request = model_sharded_state_dict(chunks)
    state = dist_checkpointing.load(
        request, directory,
        strict=StrictHandling.ASSUME_OK_UNEXPECTED if strict else StrictHandling.LOG_ALL,
    )
    # A training checkpoint also holds non-sharded items (scheduler, trainer state) that
    # dist_checkpointing merges in at the top level: keep only the model's.
    state = {k: v for k, v in state.items() if k in request}
    if len(chunks) == 1:
        _bare(chunks[0]).load_state_dict(state, strict=strict)
    else:
        for i, chunk in enumerate(chunks):
            _bare(chunk).load_state_dict(state[f"model{i}"], strict=strict)
