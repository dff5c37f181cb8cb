"""Helper processes that must not outlive the trainer."""

from __future__ import annotations

import os
import signal


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent (the trainer) dies.

    A trainer killed by SIGKILL (OOM killer, a failed node, a fault-injection test)
    cannot shut its helper processes down; orphans would keep running and hold the
    job's stdout open, so the launcher would wait for them forever. Used as the
    initializer of every helper process the project starts (reward pools, the
    checkpoint writer's results manager). Linux only; a no-op elsewhere.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)
