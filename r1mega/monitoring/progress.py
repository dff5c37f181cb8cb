"""Progress bars for long phases (generation, pretraining), on global rank 0 only.

A step line is printed when a step ends; a phase that takes minutes (decoding long
responses, pretraining the tiny base model) shows a bar meanwhile. The bar goes to
stderr and only when it is a terminal (tqdm's ``disable=None``), so logs and captured
output stay clean; ``R1MEGA_PROGRESS=0`` turns bars off everywhere.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


@contextlib.contextmanager
def progress_bar(total: int, description: str, unit: str = "it") -> Iterator[Any]:
    """A tqdm bar on rank 0 (a no-op object elsewhere); ``bar.update(n)`` advances it."""
    if not _is_rank0() or os.environ.get("R1MEGA_PROGRESS") == "0":
        yield _NoBar()
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc=description, unit=unit, disable=None, leave=False,
               dynamic_ncols=True, mininterval=0.5)
    try:
        yield bar
    finally:
        bar.close()


class _NoBar:
    def update(self, n: int = 1) -> None:
        return None
