"""Fault injection for the resume tests, like the trainer's ``R1MEGA_KILL_AFTER_STEP``.

``R1MEGA_SAMPLE_KILL=<n>:<point>`` SIGKILLs every rank at ``point`` of the ``n``-th batch
this process runs (1-based, counting from this start, not from the first prompt):

* ``after``: after the batch is committed -- a crash between batches;
* ``rows``: after the batch's rows are in ``dataset.jsonl`` but before its progress lines
  are, with half of one more row appended first -- a crash during the commit, leaving
  rows of an unfinished batch and a torn last line for the next start to remove.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch.distributed as dist

KILL_ENV = "R1MEGA_SAMPLE_KILL"
POINTS = ("rows", "after")
TORN_ROW = b'{"prompt": "a row cut short by a cra'


def _armed(batch: int, point: str) -> bool:
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return False
    number, _, where = spec.partition(":")
    where = where or "after"
    if where not in POINTS:
        raise ValueError(f"{KILL_ENV}={spec!r}: the point must be one of {POINTS}")
    return int(number) == batch and where == point


def maybe_kill(batch: int, point: str, dataset: Path | None = None) -> None:
    """Kill every rank here if ``R1MEGA_SAMPLE_KILL`` asks for this batch and point
    (collective when armed; rank 0 tears ``dataset`` first at the ``rows`` point)."""
    if not _armed(batch, point):
        return
    if point == "rows" and dataset is not None and dist.get_rank() == 0:
        with open(dataset, "ab") as f:
            f.write(TORN_ROW)
            f.flush()
            os.fsync(f.fileno())
    dist.barrier()
    os.kill(os.getpid(), signal.SIGKILL)
