"""Helper processes that must not outlive the trainer."""

from __future__ import annotations

import os
import signal


def die_with_parent(expected_parent: int | None = None) -> None:
    """Have the kernel SIGKILL this process when its parent (the trainer) dies.

    A trainer killed by SIGKILL (OOM killer, a failed node, a fault-injection test)
    cannot shut its helper processes down; orphans would keep running and hold the
    job's stdout open, so the launcher would wait for them forever. Used as the
    initializer of every helper process the project starts (reward workers, the
    checkpoint writer's results manager) and by every rank a local launcher starts.
    Linux only; a no-op elsewhere.

    If the parent died before the request took effect, the process exits: its parent is
    then no longer ``expected_parent`` (when given), or it was adopted by PID 1.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    parent = os.getppid()
    if parent == 1 or (expected_parent is not None and parent != expected_parent):
        os._exit(1)
