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

from r1mega.preemption import REQUEUE_EXIT_CODE


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
    """Run ``python -m r1mega.cli <argv>`` as ``nproc`` local ranks; returns the exit code.

    Preemption works as under Slurm: SIGUSR1 or SIGTERM to this launcher reaches the
    ranks as SIGTERM (torch's elastic agent forwards SIGTERM, then waits for them), the
    ranks checkpoint and leave, and the launcher exits with ``REQUEUE_EXIT_CODE`` when
    rank 0 confirmed the checkpoint through the requeue marker file.
    """
    import signal
    import tempfile

    from torch.distributed.run import main as torchrun_main

    from r1mega.preemption import REQUEUE_MARKER_ENV

    marker = os.path.join(tempfile.mkdtemp(prefix="r1mega-"), "requeue")
    os.environ[REQUEUE_MARKER_ENV] = marker
    signal.signal(signal.SIGUSR1, lambda *_: os.kill(os.getpid(), signal.SIGTERM))

    args = [
        "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1",
        "--master-port", str(port or free_port()),
        # "--": the job's own arguments are never parsed as the launcher's (its
        # prefix matching reads --nproc or --n as ambiguous abbreviations of its own).
        "--module", "r1mega.cli", "--", *argv,
    ]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        torchrun_main(args)
    except SystemExit as exc:  # the elastic launcher exits with the workers' status
        code = int(exc.code or 0)
    except Exception as exc:  # noqa: BLE001 - ChildFailedError: the worker already printed
        codes = {f.exitcode for f in getattr(exc, "failures", {}).values()}
        code = REQUEUE_EXIT_CODE if codes == {REQUEUE_EXIT_CODE} else 1
        if code != REQUEUE_EXIT_CODE and not os.path.exists(marker):
            print(f"r1mega: a worker process failed ({type(exc).__name__})", file=sys.stderr)
    else:
        code = 0
    if os.path.exists(marker):
        # Rank 0 wrote the marker after the preemption checkpoint was on disk.
        return REQUEUE_EXIT_CODE
    return code
