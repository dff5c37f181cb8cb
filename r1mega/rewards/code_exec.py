"""``code``: run the program in the response against stdin/stdout test cases.

The program is the last ```` ```python ```` (or ```` ```py ````, or untagged) fenced block
inside the last ``<answer>`` block, or the whole answer block if it has no fence. Test
cases come from ``metadata["tests"]``: a list (or its JSON string) of
``{"input": stdin, "output": expected stdout}``. Outputs match when they are equal after
removing trailing whitespace from every line and trailing blank lines (``print`` adds a
newline the expected output often lacks). Score = passed / total, or with
``all_or_nothing: true`` 1.0 only if every test passes.

Each test runs ``python -I -S main.py`` (isolated mode: no user site, no ``PYTHON*``
variables, no site-packages) in a fresh temporary directory as cwd, with an environment
holding only ``PATH``, stdin read from a file, and stdout/stderr written to files (so a
program printing forever fills at most ``max_output_mb``, not the trainer's memory).
``resource`` limits are set in ``preexec_fn``:

* ``RLIMIT_AS`` = ``memory_mb`` (default 512): allocations beyond it raise MemoryError;
* ``RLIMIT_CPU`` = ceil(``timeout_s``) + 1 s: a busy loop dies even if the wall-clock kill
  were delayed;
* ``RLIMIT_FSIZE`` = ``max_output_mb``: bounds every file the program writes;
* ``RLIMIT_CORE`` = 0;
* ``RLIMIT_NPROC`` only if ``max_processes`` is set: the limit counts all processes (and
  threads) of the *user*, not of the sandbox, so a small value breaks under a busy trainer,
  and root ignores it anyway.

The program is started in its own session and its whole process group is killed after it
finishes or exceeds ``timeout_s`` of wall time, so forked children cannot outlive it.

This is resource containment, not a security boundary: the program can read files the
trainer's user can read and open network connections. Untrusted code at scale belongs in
a container or nsjail.

Tests run concurrently on ``workers`` threads (the threads only wait on subprocesses).
The ``preexec_fn`` only calls ``setrlimit`` with precomputed integers, which is safe after
``fork`` in a threaded parent; a child that still got stuck before ``exec`` would be killed
by the wall-clock timeout like any other.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r1mega.rewards.base import Reward, RewardInput, RewardResult
from r1mega.rewards.extract import last_answer_block, last_code_block
from r1mega.rewards.registry import register_reward

__all__ = ["CodeReward", "RunResult", "extract_program", "outputs_match", "run_program"]

_STDERR_TAIL = 2000


@dataclass(slots=True)
class RunResult:
    """One execution. ``status``: ok | timeout | memory | output_limit | runtime_error."""

    status: str
    stdout: str
    stderr: str  # the last 2000 characters
    returncode: int | None
    seconds: float


def extract_program(response: str) -> str | None:
    """The program in the last answer block (see the module docstring); None if absent."""
    block = last_answer_block(response)
    if block is None:
        return None
    code = last_code_block(block)
    program = block if code is None else code
    return program if program.strip() else None


def _normalise(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def outputs_match(actual: str, expected: str) -> bool:
    """Equal after stripping trailing whitespace per line and trailing blank lines."""
    return _normalise(actual) == _normalise(expected)


def _pair(limit: int, soft: int, hard: int | None = None) -> tuple[int, int]:
    """(soft, hard) clamped to the hard limit this process already has.

    An unprivileged process cannot raise its hard limit; asking for more would make
    ``setrlimit`` fail in the child and the test error out for reasons of the host.
    """
    hard = soft if hard is None else hard
    _, current = resource.getrlimit(limit)
    if current != resource.RLIM_INFINITY:
        soft, hard = min(soft, current), min(hard, current)
    return soft, hard


def _limits_fn(
    memory_mb: int, cpu_s: int, output_mb: int, max_processes: int | None
) -> Callable[[], None]:
    """The ``preexec_fn``; every value is computed here, in the parent, beforehand."""
    limits = [
        (resource.RLIMIT_AS, _pair(resource.RLIMIT_AS, memory_mb * 2**20)),
        # SIGXCPU at the soft limit, SIGKILL one second later at the hard one.
        (resource.RLIMIT_CPU, _pair(resource.RLIMIT_CPU, cpu_s, cpu_s + 1)),
        (resource.RLIMIT_FSIZE, _pair(resource.RLIMIT_FSIZE, output_mb * 2**20)),
        (resource.RLIMIT_CORE, (0, 0)),
    ]
    if max_processes is not None:
        limits.append((resource.RLIMIT_NPROC, _pair(resource.RLIMIT_NPROC, max_processes)))

    def apply() -> None:
        for which, pair in limits:
            resource.setrlimit(which, pair)

    return apply


def _tail(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - limit))
        return f.read().decode("utf-8", errors="replace")


def run_program(
    program: str,
    stdin: str,
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    max_output_mb: int = 16,
    max_processes: int | None = None,
    python: str | None = None,
) -> RunResult:
    """Run ``program`` once in the sandbox described in the module docstring."""
    with tempfile.TemporaryDirectory(prefix="r1mega-code-") as tmp:
        # cwd holds only the program; the I/O files live beside it, out of its way.
        work, io_dir = Path(tmp, "work"), Path(tmp, "io")
        work.mkdir()
        io_dir.mkdir()
        (work / "main.py").write_text(program, encoding="utf-8")
        in_path, out_path, err_path = io_dir / "stdin", io_dir / "stdout", io_dir / "stderr"
        in_path.write_text(stdin, encoding="utf-8")
        preexec = _limits_fn(memory_mb, math.ceil(timeout_s) + 1, max_output_mb, max_processes)
        env = {"PATH": os.environ.get("PATH", os.defpath)}
        start = time.monotonic()
        with (
            open(in_path, "rb") as fin,
            open(out_path, "wb") as fout,
            open(err_path, "wb") as ferr,
        ):
            proc = subprocess.Popen(
                [python or sys.executable, "-I", "-S", "main.py"],
                stdin=fin,
                stdout=fout,
                stderr=ferr,
                cwd=work,
                env=env,
                preexec_fn=preexec,
                start_new_session=True,
                close_fds=True,
            )
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:  # the program and anything it forked
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        seconds = time.monotonic() - start
        stdout = out_path.read_bytes().decode("utf-8", errors="replace")
        stderr = _tail(err_path, _STDERR_TAIL)

    rc = proc.returncode
    if timed_out or rc in (-signal.SIGXCPU, -signal.SIGKILL):
        status = "timeout"
    elif rc == -signal.SIGXFSZ or (rc != 0 and "File too large" in stderr):
        # Python ignores SIGXFSZ, so hitting RLIMIT_FSIZE surfaces as OSError(EFBIG).
        status = "output_limit"
    elif rc != 0 and ("MemoryError" in stderr or "Cannot allocate memory" in stderr):
        status = "memory"
    elif rc != 0:
        status = "runtime_error"
    else:
        status = "ok"
    return RunResult(status, stdout, stderr, rc, seconds)


def _load_tests(metadata: dict[str, Any]) -> list[dict[str, str]]:
    tests = metadata.get("tests")
    if isinstance(tests, str):
        tests = json.loads(tests)
    if not isinstance(tests, list) or not tests:
        raise ValueError('metadata["tests"] must be a non-empty list of {input, output}')
    for t in tests:
        if not isinstance(t, dict) or "input" not in t or "output" not in t:
            raise ValueError(f"test case without input/output: {str(t)[:200]}")
    return tests


@register_reward("code")
class CodeReward(Reward):
    """Fraction of ``metadata["tests"]`` the response's program passes."""

    @dataclass
    class Params:
        timeout_s: float | None = None  # wall clock per test; None = rewards.timeout_s
        memory_mb: int = 512
        max_output_mb: int = 16
        max_processes: int | None = None  # RLIMIT_NPROC; see the module docstring
        all_or_nothing: bool = False
        workers: int | None = None  # concurrent tests; None = rewards.workers
        python: str | None = None  # interpreter; None = the trainer's own

    def __init__(self, params: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        p = self.params
        self.run_timeout_s = self.timeout_s if p.timeout_s is None else p.timeout_s
        self.run_workers = self.workers if p.workers is None else p.workers
        if not self.run_timeout_s > 0:
            raise self.param_error("timeout_s", f"must be > 0, got {self.run_timeout_s}")
        for key, value, low in (
            ("memory_mb", p.memory_mb, 32),  # the interpreter itself needs ~20 MiB
            ("max_output_mb", p.max_output_mb, 1),
            ("workers", self.run_workers, 1),
            ("max_processes", p.max_processes, 1),
        ):
            if value is not None and value < low:
                raise self.param_error(key, f"must be >= {low}, got {value}")
        self._counts: Counter[str] = Counter()

    def _run(self, program: str, test: dict[str, str]) -> tuple[bool, RunResult]:
        p = self.params
        result = run_program(
            program,
            str(test["input"]),
            timeout_s=self.run_timeout_s,
            memory_mb=p.memory_mb,
            max_output_mb=p.max_output_mb,
            max_processes=p.max_processes,
            python=p.python,
        )
        return result.status == "ok" and outputs_match(result.stdout, str(test["output"])), result

    def __call__(self, samples: Sequence[RewardInput]) -> list[RewardResult]:
        results: list[RewardResult | None] = [None] * len(samples)
        work: list[tuple[int, str, dict[str, str]]] = []
        totals: dict[int, int] = {}
        for i, s in enumerate(samples):
            try:
                tests = _load_tests(s.metadata)
            except (ValueError, json.JSONDecodeError) as e:
                self._counts["no_tests"] += 1
                results[i] = RewardResult(0.0, {"error": str(e)})
                continue
            program = extract_program(s.response)
            if program is None:
                self._counts["no_program"] += 1
                results[i] = RewardResult(0.0, {"no_answer": True})
                continue
            self._counts["programs"] += 1
            totals[i] = len(tests)
            work.extend((i, program, t) for t in tests)

        if work:
            with ThreadPoolExecutor(max_workers=self.run_workers) as pool:
                runs = list(pool.map(lambda w: self._run(w[1], w[2]), work))
            per_sample: dict[int, list[tuple[bool, RunResult]]] = {i: [] for i in totals}
            for (i, _, _), run in zip(work, runs, strict=True):
                per_sample[i].append(run)
            for i, outcomes in per_sample.items():
                passed = sum(ok for ok, _ in outcomes)
                statuses = [
                    ("pass" if ok else ("wrong" if r.status == "ok" else r.status))
                    for ok, r in outcomes
                ]
                self._counts["tests"] += len(outcomes)
                self._counts["passed"] += passed
                self._counts.update(s for s in statuses if s != "pass")
                if self.params.all_or_nothing:
                    score = 1.0 if passed == totals[i] else 0.0
                else:
                    score = passed / totals[i]
                info: dict[str, Any] = {"passed": passed, "total": totals[i], "tests": statuses}
                if any(s == "timeout" for s in statuses):
                    info["timeout"] = True
                first_bad = next((r for ok, r in outcomes if not ok and r.stderr), None)
                if first_bad is not None:
                    info["stderr"] = first_bad.stderr[-500:]
                results[i] = RewardResult(score, info)
        return [r if r is not None else RewardResult(0.0, {"error": "unscored"}) for r in results]

    def stats(self) -> dict[str, int]:
        keys = (
            "programs",
            "tests",
            "passed",
            "wrong",
            "timeout",
            "memory",
            "output_limit",
            "runtime_error",
            "no_program",
            "no_tests",
        )
        return {k: int(self._counts[k]) for k in keys}
