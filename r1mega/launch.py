"""Start the job's processes when `r1mega` is run directly from a shell.

Under torchrun or Slurm's srun every process already knows its rank, and the CLI just
runs. From a plain shell, a job whose layout needs N processes on this node is started
as N local processes through torch's elastic launcher (what `torchrun` does), on a free
port so that concurrent jobs and tests do not collide.
"""

from __future__ import annotations

import os
import socket
import sys


def under_launcher() -> bool:
    """True when this process was started by torchrun or srun."""
    env = os.environ
    return ("RANK" in env and "WORLD_SIZE" in env) or "SLURM_PROCID" in env


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def relaunch_local(nproc: int, argv: list[str], port: int | None = None) -> int:
    """Run ``python -m r1mega.cli <argv>`` as ``nproc`` local ranks; returns the exit code."""
    from torch.distributed.run import main as torchrun_main

    args = [
        "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1",
        "--master-port", str(port or free_port()),
        "--module", "r1mega.cli", *argv,
    ]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        torchrun_main(args)
    except SystemExit as exc:  # the elastic launcher exits with the workers' status
        return int(exc.code or 0)
    except Exception as exc:  # noqa: BLE001 - ChildFailedError: the worker already printed
        print(f"r1mega: a worker process failed ({type(exc).__name__})", file=sys.stderr)
        return 1
    return 0
