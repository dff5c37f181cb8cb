"""Start the job's processes when `r1mega` is run directly from a shell, and keep their
lifetimes tied together.

Under torchrun or Slurm's srun every process already knows its rank, and the CLI just
runs. From a plain shell, a job whose layout needs N processes on this node is started
as N local processes through torch's elastic launcher (what `torchrun` does), on a free
port so that concurrent jobs and tests do not collide.

Lifetimes (:func:`run_rank`, used by every rank):

* **a rank dies with its launcher**: the kernel SIGKILLs it when the launcher dies
  (``PR_SET_PDEATHSIG``), and a watchdog thread checks the parent as well; the rank's own
  helpers (reward scoring workers, the checkpoint writer's manager) die with the rank the
  same way, and W&B's service watches the rank's pid;
* **one failure, one line**: a rank whose job raises writes the error and its traceback
  to the job's error directory and exits at once (no traceback on the console). The
  other ranks' watchdogs see the record and exit too, before they can add tracebacks or
  gloo's "connection closed by peer" errors of their own. The launcher then prints one
  line naming the rank that failed first and its error, with the path of the full
  traceback (:func:`failure_summary`); a rank killed by a signal is named as such.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from r1mega.preemption import REQUEUE_EXIT_CODE

LAUNCHER_PID_ENV = "R1MEGA_LAUNCHER_PID"
ERROR_DIR_ENV = "R1MEGA_ERROR_DIR"
_WATCHDOG_INTERVAL_S = 0.25


def under_launcher() -> bool:
    """True when this process was started by torchrun or srun."""
    env = os.environ
    return ("RANK" in env and "WORLD_SIZE" in env) or "SLURM_PROCID" in env


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------- rank side


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def _exit_now(code: int) -> None:
    """Leave without running atexit handlers or finalizers (which may join threads stuck
    on dead peers); flush what was printed first."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _watchdog(launcher: int | None, error_dir: Path | None, rank: int) -> None:
    """Exit when the launcher is gone or another rank has failed."""
    mine = f"rank_{rank}.json"
    while True:
        if launcher is not None and os.getppid() != launcher:
            _exit_now(1)
        if error_dir is not None:
            try:
                if any(p.name != mine for p in error_dir.glob("rank_*.json")):
                    _exit_now(1)
            except OSError:
                pass
        time.sleep(_WATCHDOG_INTERVAL_S)


def guard_lifetime() -> None:
    """Tie this rank's life to its launcher's (see the module docstring)."""
    from r1mega.utils.process import die_with_parent

    launcher = os.environ.get(LAUNCHER_PID_ENV)
    error_dir = os.environ.get(ERROR_DIR_ENV)
    if launcher is not None:
        die_with_parent(expected_parent=int(launcher))
    elif "TORCHELASTIC_RUN_ID" in os.environ:  # a user's torchrun: its agent is the parent
        die_with_parent()
    if launcher is not None or error_dir is not None:
        threading.Thread(target=_watchdog, name="r1mega-lifetime-watchdog", daemon=True,
                         args=(int(launcher) if launcher else None,
                               Path(error_dir) if error_dir else None, _rank())).start()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {text[:600]}"


def report_failure(exc: BaseException) -> None:
    """Record this rank's failure: its traceback in a file, and either a record for the
    launcher (under :func:`relaunch_local`) or one line on stderr."""
    rank = _rank()
    error_dir = os.environ.get(ERROR_DIR_ENV)
    text = "".join(traceback.format_exception(exc))
    if error_dir:
        trace_path = Path(error_dir) / f"rank_{rank}.traceback"
    else:
        import tempfile

        fd, name = tempfile.mkstemp(prefix=f"r1mega-rank{rank}-", suffix=".traceback")
        os.close(fd)
        trace_path = Path(name)
    trace_path.write_text(text)
    if os.environ.get("R1MEGA_VERBOSE"):
        print(text, file=sys.stderr)
    if error_dir:
        record = {"rank": rank, "error": _one_line(exc), "time": time.time(),
                  "traceback": str(trace_path)}
        tmp = Path(error_dir) / f".rank_{rank}.json.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, Path(error_dir) / f"rank_{rank}.json")  # atomic: peers poll it
    else:
        print(f"r1mega: rank {rank} failed: {_one_line(exc)} (full traceback: {trace_path})",
              file=sys.stderr)


def run_rank(job: Callable[[], Any]) -> int:
    """Run one rank's job under the lifetime rules; returns its exit code.

    ``SystemExit`` passes through (the preemption requeue code among others); any other
    exception is reported once (:func:`report_failure`) and the process exits with 1
    right away."""
    guard_lifetime()
    try:
        job()
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt included
        try:
            report_failure(exc)
        finally:
            _exit_now(1)
    return 0


# ----------------------------------------------------------------------------- launcher


def _signal_name(exitcode: int) -> str:
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"


def failure_summary(error_dir: str | Path, failures: dict[int, Any]) -> str:
    """One line naming the rank that failed first and why.

    ``failures``: global rank -> torch's ``ProcessFailure`` (exit code, timestamp). A
    rank killed by a signal other than SIGTERM (which the launcher itself sends to the
    survivors when it stops them) left no record and is the cause: the others' errors
    follow from it. Otherwise the earliest record wins, then the earliest failure."""
    def recorded(rank: int) -> bool:
        return (Path(error_dir) / f"rank_{rank}.json").exists()

    deaths = sorted((getattr(f, "timestamp", 0), rank, f.exitcode)
                    for rank, f in failures.items() if f.exitcode < 0 and not recorded(rank))
    killed = [d for d in deaths if -d[2] != signal.SIGTERM]
    if killed:
        _, rank, code = killed[0]
        return f"r1mega: rank {rank} was killed by {_signal_name(code)}"
    records = []
    for path in Path(error_dir).glob("rank_*.json"):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    if records:
        first = min(records, key=lambda r: r["time"])
        return (f"r1mega: rank {first['rank']} failed: {first['error']} "
                f"(full traceback: {first['traceback']})")
    if deaths:
        _, rank, code = deaths[0]
        return f"r1mega: rank {rank} was killed by {_signal_name(code)}"
    exits = sorted((getattr(f, "timestamp", 0), rank, f.exitcode)
                   for rank, f in failures.items() if f.exitcode)
    if exits:
        _, rank, code = exits[0]
        return f"r1mega: rank {rank} exited with status {code}"
    return "r1mega: a worker process failed"


def relaunch_local(nproc: int, argv: list[str], port: int | None = None,
                   module: str = "r1mega.cli") -> int:
    """Run ``python -m <module> <argv>`` as ``nproc`` local ranks; returns the exit code.

    Preemption works as under Slurm: SIGUSR1 or SIGTERM to this launcher reaches the
    ranks as SIGTERM (torch's elastic agent forwards SIGTERM, then waits for them), the
    ranks checkpoint and leave, and the launcher exits with ``REQUEUE_EXIT_CODE`` when
    rank 0 confirmed the checkpoint through the requeue marker file. A failure prints one
    line (:func:`failure_summary`).
    """
    import logging
    import shutil
    import tempfile

    from torch.distributed.run import main as torchrun_main

    from r1mega.preemption import REQUEUE_MARKER_ENV

    marker = os.path.join(tempfile.mkdtemp(prefix="r1mega-"), "requeue")
    error_dir = tempfile.mkdtemp(prefix="r1mega-errors-")
    os.environ[REQUEUE_MARKER_ENV] = marker
    os.environ[ERROR_DIR_ENV] = error_dir
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
    signal.signal(signal.SIGUSR1, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    # The agent's own failure report (a table per rank) would repeat what our one line says.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)

    args = [
        "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1",
        "--master-port", str(port or free_port()),
        # "--": the job's own arguments are never parsed as the launcher's (its
        # prefix matching reads --nproc or --n as ambiguous abbreviations of its own).
        "--module", module, "--", *argv,
    ]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        torchrun_main(args)
    except SystemExit as exc:  # the elastic launcher exits with the workers' status
        code = int(exc.code or 0)
    except Exception as exc:  # noqa: BLE001 - ChildFailedError: summarised below
        failures = dict(getattr(exc, "failures", {}) or {})
        codes = {f.exitcode for f in failures.values()}
        code = REQUEUE_EXIT_CODE if codes == {REQUEUE_EXIT_CODE} else 1
        if code != REQUEUE_EXIT_CODE and not os.path.exists(marker):
            print(failure_summary(error_dir, failures), file=sys.stderr)
    else:
        code = 0
    if code == 0:
        shutil.rmtree(error_dir, ignore_errors=True)
    if os.path.exists(marker):
        # Rank 0 wrote the marker after the preemption checkpoint was on disk.
        return REQUEUE_EXIT_CODE
    return code
