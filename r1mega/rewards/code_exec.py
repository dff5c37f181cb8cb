"""``code``: run the program in the response against stdin/stdout test cases.

The program is the last ```` ```python ```` (or ```` ```py ````, or untagged) fenced block
inside the last ``<answer>`` block, or the whole answer block if it has no fence. Test
cases come from ``metadata["tests"]``: a list (or its JSON string) of
``{"input": stdin, "output": expected stdout}``. Outputs match when they are equal after
removing trailing whitespace from every line and trailing blank lines (``print`` adds a
newline the expected output often lacks). Score = passed / total, or with
``all_or_nothing: true`` 1.0 only if every test passes.

Each test runs ``python -I -S main.py`` in a sandbox (:mod:`r1mega.rewards.sandbox`):
by default bubblewrap namespaces with an unprivileged user, a private writable directory,
no network and no view of the trainer's processes, plus limits on wall time
(``timeout_s``), CPU time, memory (``memory_mb``), output (``max_output_mb``) and
processes (``max_processes``); every process the program started is killed at the end.
Without bubblewrap the reward refuses to start, naming what is missing, unless
``params.sandbox: none`` explicitly accepts running programs with limits only.

The tests of one response run ``workers`` at a time in the scoring worker that scores it
(threads that only wait on subprocesses); its time budget is what those runs may take.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from r1mega.rewards.base import Reward, RewardInput, RewardResult
from r1mega.rewards.extract import last_answer_block, last_code_block
from r1mega.rewards.registry import register_reward
from r1mega.rewards.sandbox import (
    SANDBOX_MODES,
    Limits,
    RunResult,
    Sandbox,
    SandboxUnavailable,
    run_program,
)

__all__ = ["CodeReward", "RunResult", "extract_program", "outputs_match", "run_program"]

logger = logging.getLogger(__name__)

# Starting a sandbox and an interpreter, and collecting the result, beyond the program's
# own wall time (measured: ~0.05 s; generous for a loaded machine).
_RUN_OVERHEAD_S = 2.0
STATUSES = ("wrong", "timeout", "memory", "output_limit", "runtime_error")


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
        max_processes: int = 64  # processes and threads of one run
        all_or_nothing: bool = False
        workers: int | None = None  # concurrent tests of one response; None = rewards.workers
        python: str | None = None  # interpreter; None = the trainer's own
        sandbox: str = "bwrap"  # bwrap | none (limits only: no isolation)

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
            if value < low:
                raise self.param_error(key, f"must be >= {low}, got {value}")
        if p.sandbox not in SANDBOX_MODES:
            raise self.param_error("sandbox", f"expected one of {', '.join(SANDBOX_MODES)}, "
                                   f"got {p.sandbox!r}")
        try:
            self.sandbox = Sandbox.create(p.sandbox, p.python)
        except SandboxUnavailable as e:
            raise self.param_error(
                "sandbox", f"{e}; set {self.where}.sandbox: none to run programs without "
                "isolation (resource limits only)") from None
        if p.sandbox == "none":
            logger.warning("%s.sandbox: none: programs run as the trainer's user, in its "
                           "namespaces, with resource limits only", self.where)
        self.limits = Limits(self.run_timeout_s, p.memory_mb, p.max_output_mb, p.max_processes)

    def budget_s(self, sample: RewardInput) -> float:
        try:
            tests = len(_load_tests(sample.metadata))
        except (ValueError, json.JSONDecodeError):
            tests = 1
        rounds = math.ceil(tests / self.run_workers)
        return rounds * (self.run_timeout_s + _RUN_OVERHEAD_S) + _RUN_OVERHEAD_S

    def _run(self, program: str, test: dict[str, str]) -> tuple[bool, RunResult]:
        result = run_program(program, str(test["input"]), limits=self.limits,
                             sandbox=self.sandbox)
        return result.status == "ok" and outputs_match(result.stdout, str(test["output"])), result

    def score(self, sample: RewardInput) -> RewardResult:
        try:
            tests = _load_tests(sample.metadata)
        except (ValueError, json.JSONDecodeError) as e:
            return RewardResult(0.0, {"error": str(e), "no_tests": True})
        program = extract_program(sample.response)
        if program is None:
            return RewardResult(0.0, {"no_answer": True})
        with ThreadPoolExecutor(max_workers=min(self.run_workers, len(tests))) as pool:
            outcomes = list(pool.map(lambda t: self._run(program, t), tests))
        passed = sum(ok for ok, _ in outcomes)
        statuses = [("pass" if ok else ("wrong" if r.status == "ok" else r.status))
                    for ok, r in outcomes]
        if self.params.all_or_nothing:
            score = 1.0 if passed == len(tests) else 0.0
        else:
            score = passed / len(tests)
        info: dict[str, Any] = {"passed": passed, "total": len(tests), "tests": statuses}
        if "timeout" in statuses:
            info["timeout"] = True
        first_bad = next((r for ok, r in outcomes if not ok and r.stderr), None)
        if first_bad is not None:
            info["stderr"] = first_bad.stderr[-500:]
        return RewardResult(score, info)

    def counters(self, sample: RewardInput, result: RewardResult) -> Iterable[str]:
        info = result.info
        if info.get("no_answer"):
            return ["no_program"]
        if info.get("no_tests"):
            return ["no_tests"]
        statuses = info.get("tests")
        if not isinstance(statuses, list):
            return []  # the budget ran out or the scoring failed: counted by the base class
        return ["programs", *(["tests"] * len(statuses)),
                *("passed" if s == "pass" else s for s in statuses)]

    def record(self, sample: RewardInput, result: RewardResult) -> None:
        # A program whose tests timed out is not a budget timeout of the reward itself.
        if isinstance(result.info.get("tests"), list):
            self._counts["samples"] += 1
            self._counts.update(self.counters(sample, result))
        else:
            super().record(sample, result)

    def stats(self) -> dict[str, int]:
        keys = ("samples", "timeouts", "errors", "programs", "tests", "passed", *STATUSES,
                "no_program", "no_tests")
        counts = super().stats()
        return {k: int(counts.get(k, 0)) for k in keys}
