"""Jobs die cleanly: no process outlives its launcher, one failure gives one line.

A tiny job (``tests/workers/lifetime_job.py``: 2 ranks of the real local launcher, gloo,
reward scoring workers that were already killed and replaced after a timeout, W&B's
service) is started with a unique marker in its environment; every descendant inherits
it, so "nothing outlived the job" is checked by looking for the marker in
``/proc/*/environ``, not by timing. Then the launcher is killed, a rank is killed, or a
rank raises.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from tests.distributed import ROOT

DRIVER = ("import sys\n"
          "from r1mega.launch import relaunch_local\n"
          "sys.exit(relaunch_local(2, sys.argv[1:], module='tests.workers.lifetime_job'))\n")


def _marked(marker: str) -> dict[int, dict[str, str]]:
    """Live processes carrying ``marker`` in their environment: pid -> environment."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                raw = f.read()
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in raw and state != "Z":
            env = dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0")
                       if "=" in item)
            found[int(entry)] = env
    return found


def _gone(marker: str, patience_s: float = 60.0) -> dict[int, dict[str, str]]:
    """What still carries the marker once the processes had ``patience_s`` to die (a
    killed process is reaped asynchronously; W&B's service polls its parent)."""
    deadline = time.monotonic() + patience_s
    while (left := _marked(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


class Job:
    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.marker = f"r1mega-lifetime-{uuid.uuid4().hex}"
        self.log = tmp_path / "job.out"
        self.err = tmp_path / "job.err"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
               "R1MEGA_TEST_MARKER": self.marker, "WANDB_DIR": str(tmp_path),
               "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(var, None)
        with open(self.log, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", DRIVER, *args], stdout=out,
                                         stderr=err, env=env, cwd=ROOT,
                                         start_new_session=True)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 300
        while self.log.read_text().count(" ready pid ") < 2:
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.2)

    def rank_pid(self, rank: int) -> int:
        (pid,) = [p for p, env in _marked(self.marker).items()
                  if env.get("RANK") == str(rank) and "TORCHELASTIC_RUN_ID" in env
                  and env.get(  # the rank itself, not its scoring workers
                      "R1MEGA_LAUNCHER_PID") == str(self.proc.pid)
                  and Path(f"/proc/{p}/cmdline").read_bytes().count(b"lifetime_job")]
        return pid

    def output(self) -> str:
        return self.log.read_text()[-3000:] + "\n--- stderr ---\n" + self.err.read_text()[-5000:]

    def kill_everything(self) -> None:
        for pid in _marked(self.marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and "gloo" not in stderr.lower(), stderr
    return lines[0]


def test_ranks_and_their_helpers_die_with_the_launcher(tmp_path: Path) -> None:
    job = Job(tmp_path, "run", "--rewards", "--wandb")
    try:
        job.wait_ready()
        before = _marked(job.marker)
        # launcher, 2 ranks, the scoring worker, W&B's service
        assert len(before) >= 5, before.keys()
        os.kill(job.proc.pid, signal.SIGKILL)
        job.proc.wait()
        left = _gone(job.marker)
        assert left == {}, {p: Path(f"/proc/{p}/cmdline").read_bytes()[:200] for p in left}
    finally:
        job.kill_everything()


def test_a_killed_rank_ends_the_job_with_one_line(tmp_path: Path) -> None:
    job = Job(tmp_path, "run")
    try:
        job.wait_ready()
        os.kill(job.rank_pid(1), signal.SIGKILL)
        code = job.proc.wait(timeout=300)
        assert code == 1, job.output()
        assert _one_line(job.err.read_text()) == "r1mega: rank 1 was killed by SIGKILL"
        assert _gone(job.marker) == {}
    finally:
        job.kill_everything()


def test_a_failing_rank_ends_the_job_with_one_line(tmp_path: Path) -> None:
    job = Job(tmp_path, "crash", "1", "--rewards")
    try:
        code = job.proc.wait(timeout=300)
        assert code == 1, job.output()
        line = _one_line(job.err.read_text())
        assert line.startswith("r1mega: rank 1 failed: ValueError: boom from rank 1 "), line
        trace = Path(line.split("(full traceback: ")[1].rstrip(")"))
        assert "raise ValueError" in trace.read_text()
        assert _gone(job.marker) == {}
    finally:
        job.kill_everything()
