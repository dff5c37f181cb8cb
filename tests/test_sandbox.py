"""The code reward's sandbox: every escape a policy's program could try is contained.

``tests/workers/sandbox_probe.py`` runs one hostile program that tries them all (kill the
trainer, read its ``/proc/<pid>/environ`` and ``/proc/<pid>/mem``, connect out, write
outside its directory, leave a ``setsid()`` double-forked process behind) and checks the
outcome from outside. It runs as this test's user (root in CI: the privilege drop with
``setpriv``) and as an unprivileged user with the system's Python (bubblewrap's user
namespace, the usual case on a cluster), and once without isolation, where every attack
must succeed: that proves the probes are real.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from r1mega.rewards import CodeReward, RewardInput
from r1mega.rewards.sandbox import Limits, Sandbox, SandboxUnavailable, run_program
from tests.distributed import ROOT

PROBE = ROOT / "tests" / "workers" / "sandbox_probe.py"
SYSTEM_PYTHON = "/usr/bin/python3"


def _probe(mode: str, prefix: list[str] | None = None, python: str = sys.executable) -> dict:
    env = {"PATH": os.environ.get("PATH", os.defpath)}
    proc = subprocess.run([*(prefix or []), python, str(PROBE), mode], capture_output=True,
                          text=True, timeout=300, env=env, cwd="/")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_contained(out: dict, expected_uid: int | None) -> None:
    for key in ("exiting", "hanging"):
        report = out[f"{key}_report"]
        assert isinstance(report, dict), report
        # Its own PID namespace: it is PID 2 under bubblewrap's init; nothing else exists.
        assert (report["pid"], report["ppid"]) == (2, 1), report
        assert report["visible_pids"] == [1, 2], report
        assert report["uid"] != 0
        if expected_uid is not None:
            assert report["uid"] == expected_uid
        for attack in ("environ", "cmdline", "mem", "tcp", "unix", "write_outside",
                       "kill_victim"):
            assert str(report[attack]).startswith("denied"), (attack, report)
        assert report["interfaces"] == ["lo"]
        assert out[f"{key}_survivors"] == 0, "a setsid() double-fork outlived the sandbox"
    assert out["exiting_status"] == "ok" and out["hanging_status"] == "timeout"
    assert out["victim_alive"], "the program killed the trainer stand-in"
    assert out["connections_accepted"] == 0
    assert not out["outside_written"]
    status, made = out["fork_bomb"]
    assert status == "ok" and 0 < int(made) < 8  # max_processes=8 counts the program too
    assert out["secret"] not in json.dumps({k: v for k, v in out.items() if k != "secret"})


def test_escapes_are_contained(sandbox_tools: None) -> None:
    out = _probe("bwrap")
    _assert_contained(out, expected_uid=None)


@pytest.mark.skipif(os.geteuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK),
                    reason="needs root (to become an unprivileged user) and a system Python")
def test_escapes_are_contained_for_an_unprivileged_trainer(sandbox_tools: None) -> None:
    """A trainer running as an ordinary user: bubblewrap's own user namespace, no
    setpriv. The probe must be readable by that user."""
    if not all(os.stat(p).st_mode & stat.S_IXOTH for p in [ROOT, *ROOT.parents]):
        pytest.skip(f"{ROOT} is not reachable by an unprivileged user")
    out = _probe("bwrap", ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"],
                 python=SYSTEM_PYTHON)
    _assert_contained(out, expected_uid=65534)


def test_the_same_attacks_escape_without_isolation(sandbox_tools: None) -> None:
    """``sandbox: none`` (limits only): each probe succeeds, so the checks above are real."""
    out = _probe("none")
    # both programs ran up to their daemon before they ended or were timed out
    assert isinstance(out["hanging_report"], dict), out["hanging_report"]
    report = out["exiting_report"]
    assert report["environ"] >= 1 and report["cmdline"] >= 1
    assert report["tcp"] == "connected" and report["unix"] == "connected"
    assert report["write_outside"] == "wrote" and report["kill_victim"] == "sent"
    assert out["exiting_survivors"] >= 1 and out["hanging_survivors"] >= 1
    assert not out["victim_alive"] and out["outside_written"]
    assert out["connections_accepted"] == 2


def test_sandboxed_run_environment_and_limits(sandbox_tools: None) -> None:
    sandbox = Sandbox.create("bwrap")
    probe = ("import os, sys\n"
             "print(sorted(os.environ))\n"
             "print(sorted(os.listdir('.')), os.getcwd())\n"
             "print(sys.flags.isolated, sys.flags.no_site)\n"
             "print(sorted(os.listdir('/')))\n")
    result = run_program(probe, "", limits=Limits(timeout_s=20.0), sandbox=sandbox)
    assert result.status == "ok", result.stderr
    env_line, files_line, flags_line, root_line = result.stdout.splitlines()
    # LC_CTYPE: Python's locale coercion; PWD: bubblewrap's --chdir.
    assert set(eval(env_line)) <= {"PATH", "LC_CTYPE", "PWD"}
    assert files_line == "['main.py'] /sandbox"  # a fresh directory of its own
    assert flags_line == "1 1"
    # No /etc, /home, /root (beyond the interpreter's path), /work, /run ...
    assert set(eval(root_line)) <= {"bin", "dev", "lib", "lib32", "lib64", "libx32", "proc",
                                    "sandbox", "sbin", "tmp", "usr", "etc", "root", "opt"}
    spam = run_program("while True:\n    print('x' * 10000)", "",
                       limits=Limits(timeout_s=20.0, max_output_mb=1), sandbox=sandbox)
    assert spam.status == "output_limit"
    assert len(spam.stdout) <= 2**20


def test_code_reward_refuses_without_isolation(sandbox_tools: None, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """No bubblewrap, or one the kernel refuses namespaces to: the reward does not start,
    and says what is missing and how to opt out; ``sandbox: none`` is that opt-out."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(ValueError) as info:
        CodeReward({}, where="rewards.specs[0].params")
    msg = str(info.value)
    assert "rewards.specs[0].params.sandbox" in msg
    assert "bwrap (package bubblewrap)" in msg and "not found on PATH" in msg
    assert "apt-get install" in msg and "sandbox: none" in msg

    fake = tmp_path / "fake"
    fake.mkdir()
    for tool in ("setpriv", "prlimit"):
        (fake / tool).symlink_to(shutil.which(tool, path=os.defpath) or f"/usr/bin/{tool}")
    (fake / "bwrap").write_text("#!/bin/sh\necho 'bwrap: No permissions to create new "
                                "namespace' >&2\nexit 1\n")
    (fake / "bwrap").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:/usr/bin:/bin")
    with pytest.raises(SandboxUnavailable, match="No permissions to create new namespace"):
        Sandbox.create("bwrap")

    reward = CodeReward({"sandbox": "none"})
    program = "<answer>print(int(input()) * 2)</answer>"
    result = reward.score(RewardInput("q", program, metadata={
        "tests": [{"input": "4", "output": "8"}]}))
    assert result.score == 1.0
