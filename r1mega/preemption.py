"""Graceful preemption: turn SIGTERM/SIGUSR1 into "checkpoint, then exit for requeue".

Slurm warns a job before it loses its nodes: ``--signal=USR1@300`` sends SIGUSR1 to every
task 300 s before the time limit, ``scancel --signal=USR1`` does it on demand, and
preemption or cancellation sends SIGTERM (then SIGKILL after ``KillWait``). A rank that
just died there would lose every step since the last periodic checkpoint.

:class:`PreemptionHandler` is installed on every rank. Its signal handler only records
the signal (anything more, such as a collective or file I/O, is unsafe inside a Python
signal handler, which runs between two bytecodes of whatever the main thread was doing).
The trainer asks :meth:`PreemptionHandler.should_stop` between steps; that call
all-reduces the flag so every rank takes the same decision at the same step, even though
Slurm's signals reach the ranks at slightly different times (and possibly only some of
them). The trainer then saves a checkpoint collectively and calls
:meth:`PreemptionHandler.exit_for_requeue`, which exits with :data:`REQUEUE_EXIT_CODE`
(75, ``EX_TEMPFAIL``: "try again later") after rank 0 has written the marker file named
by ``$R1MEGA_REQUEUE_MARKER``. ``slurm/launch.sh`` turns either into ``scontrol requeue``;
the requeued job resumes from that checkpoint.

Trainer integration (see ``r1mega/trainer.py``)::

    handler = PreemptionHandler().install()          # first thing in run_training
    ...
    for step in ...:
        ...train, periodic checkpoint...
        if step < cfg.train.steps and handler.should_stop():
            if not saved_this_step: save_checkpoint(...)
            handler.exit_for_requeue(checkpointed=bool(cfg.checkpoint.save_dir))
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

__all__ = [
    "PREEMPTION_SIGNALS",
    "REQUEUE_EXIT_CODE",
    "REQUEUE_MARKER_ENV",
    "PreemptionHandler",
]

# sysexits.h EX_TEMPFAIL: "temporary failure, the user is invited to retry". Distinct from
# 0 (done), 1 (a Python error), 2 (bad config/usage) and 128+N (killed by signal N), so
# the launcher can tell "checkpointed and wants a requeue" from everything else.
REQUEUE_EXIT_CODE = 75
# Set by slurm/launch.sh: rank 0 writes this file once the checkpoint is on disk. srun's
# own exit code is not enough: with --kill-on-bad-exit the first rank to exit 75 makes
# srun terminate the others and report 143.
REQUEUE_MARKER_ENV = "R1MEGA_REQUEUE_MARKER"
PREEMPTION_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)

AllReduceMax = Callable[[bool], bool]


def _torch_all_reduce_max(group: Any = None) -> AllReduceMax:
    """An all-reduce(MAX) of one flag over ``group`` with torch.distributed.

    NCCL groups need the tensor on this rank's GPU; gloo takes a CPU tensor. Without an
    initialised process group (a single plain process) the local flag is the answer.
    """

    def reduce(flag: bool) -> bool:
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return flag
        device = "cpu"
        if dist.get_backend(group) == "nccl":
            device = f"cuda:{torch.cuda.current_device()}"
        value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
        return bool(value.item())

    return reduce


class PreemptionHandler:
    """Records preemption signals and makes all ranks agree to stop between steps.

    Args:
        signals: the signals that mean "you are about to lose the nodes".
        all_reduce: ``flag -> any rank's flag`` across the job; defaults to a
            torch.distributed all-reduce(MAX) over ``group`` (the world by default).
            Tests pass a fake.
        group: torch.distributed group for the default all-reduce.
    """

    def __init__(self, signals: Iterable[signal.Signals] = PREEMPTION_SIGNALS,
                 all_reduce: AllReduceMax | None = None, group: Any = None) -> None:
        self.signals = tuple(signals)
        self._all_reduce = all_reduce or _torch_all_reduce_max(group)
        self._received: signal.Signals | None = None
        self._agreed = False
        self._previous: dict[signal.Signals, Any] = {}

    # -- signal side -------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Only record the first signal: the handler may run inside any Python code
        (a collective, a checkpoint write), where doing more is unsafe."""
        del frame
        if self._received is None:
            self._received = signal.Signals(signum)

    def install(self) -> PreemptionHandler:
        """Route the signals to this handler (main thread only); returns ``self``."""
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were in place before :meth:`install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    @property
    def received(self) -> signal.Signals | None:
        """The first preemption signal this rank got, if any (local, no communication)."""
        return self._received

    def request(self, sig: signal.Signals = signal.SIGUSR1) -> None:
        """Ask for a stop as if ``sig`` had arrived (e.g. from a wall-clock budget)."""
        self._on_signal(int(sig), None)

    # -- collective side ---------------------------------------------------------------
    def should_stop(self) -> bool:
        """True on every rank once any rank got a preemption signal.

        Collective: every rank of the group must call it at the same point of the loop
        (between steps). Once true it stays true without further communication.
        """
        if not self._agreed:
            self._agreed = self._all_reduce(self._received is not None)
        return self._agreed

    def describe(self) -> str:
        """Human-readable reason for the log line."""
        if self._received is not None:
            return f"received {self._received.name}"
        return "another rank received a preemption signal" if self._agreed else "running"

    def exit_code(self, checkpointed: bool) -> int:
        """75 when a checkpoint was saved (requeue me), else 128+signal (plain kill)."""
        if checkpointed:
            return REQUEUE_EXIT_CODE
        return 128 + int(self._received or signal.SIGTERM)

    def exit_for_requeue(self, checkpointed: bool = True, rank: int | None = None) -> NoReturn:
        """Leave the trainer after the preemption checkpoint; never returns.

        Rank 0 first writes ``$R1MEGA_REQUEUE_MARKER`` (when set and ``checkpointed``) so
        the launcher requeues even when srun reports a sibling's termination instead of
        75. Without a checkpoint (no ``checkpoint.save_dir``) a requeue would start over
        from step 1, so the exit code is then the ordinary 128+signal and no marker.
        """
        if rank is None:
            rank = _global_rank()
        marker = os.environ.get(REQUEUE_MARKER_ENV)
        if checkpointed and marker and rank == 0:
            path = Path(marker)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{self.describe()}\n")
        raise SystemExit(self.exit_code(checkpointed))


def _global_rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


def finish_step(step: int, last_step: int, checkpoint_cfg: Any,
                checkpoint: Callable[[int], None], preemption: PreemptionHandler,
                monitor: Any, before_preemption_check: Callable[[int], None] | None = None
                ) -> None:
    """What every training loop does after a step: checkpoint when due (the last step and
    every ``checkpoint.save_interval`` steps), then, on a preemption signal (Slurm's
    ``--signal``, ``scancel --signal=USR1``), checkpoint if not just done and exit with the
    code the launcher turns into a requeue."""
    interval = checkpoint_cfg.save_interval
    saved = bool(checkpoint_cfg.save_dir) and (
        step == last_step or bool(interval and step % interval == 0))
    if saved:
        checkpoint(step)
    if before_preemption_check is not None:
        before_preemption_check(step)
    if step < last_step and preemption.should_stop():
        from r1mega.logging_utils import print_rank0

        print_rank0(f"[r1mega] preemption signal: checkpointing after step {step} "
                    "and exiting for requeue")
        if checkpoint_cfg.save_dir and not saved:
            checkpoint(step)
        monitor.finish()
        preemption.exit_for_requeue(checkpointed=bool(checkpoint_cfg.save_dir))
