"""PreemptionHandler: a signal only sets a flag; should_stop makes every rank agree
(fake all-reduce, and a real 2-process gloo group); the exit code and marker tell
slurm/launch.sh whether to requeue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from r1mega.preemption import REQUEUE_EXIT_CODE, REQUEUE_MARKER_ENV, PreemptionHandler
from tests.distributed import ROOT, run_torchrun


def test_signal_sets_flag_and_should_stop() -> None:
    calls: list[bool] = []

    def fake_all_reduce(flag: bool) -> bool:
        calls.append(flag)
        return flag

    previous = signal.getsignal(signal.SIGUSR1)
    handler = PreemptionHandler(all_reduce=fake_all_reduce)
    with handler:
        assert handler.received is None
        assert not handler.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)  # delivered to the main thread right away
        assert handler.received is signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal keeps the first reason
        assert handler.received is signal.SIGUSR1
        assert handler.should_stop()
        assert handler.should_stop()  # sticky: no further communication
        assert "SIGUSR1" in handler.describe()
    assert calls == [False, True]
    assert signal.getsignal(signal.SIGUSR1) == previous  # uninstalled


def test_ranks_agree_when_only_one_got_the_signal() -> None:
    """Slurm signals reach ranks at different times; all must stop at the same step."""
    flags = {"rank0": False, "rank1": True}  # only rank 1 was signalled

    def any_rank(_: bool) -> bool:
        return any(flags.values())

    quiet = PreemptionHandler(all_reduce=any_rank)  # rank 0's view
    assert quiet.received is None
    assert quiet.should_stop()
    assert "another rank" in quiet.describe()


def test_exit_codes_and_marker(tmp_path: Path) -> None:
    marker = tmp_path / "requeue"
    code = textwrap.dedent("""
        import sys
        from r1mega.preemption import PreemptionHandler
        handler = PreemptionHandler(all_reduce=lambda flag: flag).install()
        handler.request()
        assert handler.should_stop()
        handler.exit_for_requeue(checkpointed=sys.argv[1] == "yes", rank=0)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), REQUEUE_MARKER_ENV: str(marker)}
    saved = subprocess.run([sys.executable, "-c", code, "yes"], env=env, cwd=ROOT)
    assert saved.returncode == REQUEUE_EXIT_CODE == 75
    assert marker.read_text().startswith("received SIGUSR1")
    marker.unlink()
    unsaved = subprocess.run([sys.executable, "-c", code, "no"], env=env, cwd=ROOT)
    assert unsaved.returncode == 128 + signal.SIGUSR1  # no checkpoint: no requeue
    assert not marker.exists()


def test_only_rank0_writes_the_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "requeue"
    monkeypatch.setenv(REQUEUE_MARKER_ENV, str(marker))
    handler = PreemptionHandler(all_reduce=lambda flag: flag)
    handler.request(signal.SIGTERM)
    with pytest.raises(SystemExit) as exc:
        handler.exit_for_requeue(rank=1)
    assert exc.value.code == REQUEUE_EXIT_CODE and not marker.exists()


WORKER = textwrap.dedent('''
    import json
    import os
    import signal
    import sys

    import torch.distributed as dist

    from parallel.layout import init_distributed
    from r1mega.preemption import PreemptionHandler

    init_distributed()
    rank = dist.get_rank()
    handler = PreemptionHandler().install()  # the real torch all-reduce over gloo
    before = handler.should_stop()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)
    dist.barrier()
    after = handler.should_stop()
    with open(f"{sys.argv[1]}.{rank}", "w") as f:
        json.dump({"before": before, "after": after,
                   "received": handler.received.name if handler.received else None}, f)
''')


def test_gloo_all_reduce_spreads_one_ranks_signal(tmp_path: Path) -> None:
    script = tmp_path / "preemption_worker.py"
    script.write_text(WORKER)
    out = tmp_path / "result"
    run_torchrun(2, script, out)
    results = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(2)]
    assert results[0] == {"before": False, "after": True, "received": None}
    assert results[1] == {"before": False, "after": True, "received": "SIGUSR1"}
