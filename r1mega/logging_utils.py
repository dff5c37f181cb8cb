"""Rank-aware console output."""

from __future__ import annotations

import sys

import torch.distributed as dist


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print_rank0(*args: object) -> None:
    """Print from global rank 0 only, flushed (progress lines must appear live)."""
    if is_rank0():
        print(*args, flush=True, file=sys.stdout)
