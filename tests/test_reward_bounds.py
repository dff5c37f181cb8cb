"""Every reward runs in bounded time on hostile responses.

1. **Linear work, counted, not timed.** Each reward scores 50 KB and 100 KB adversarial
   responses (the audit's ``"<think></think><answer>" * n`` and unclosed ``\\boxed{``,
   unclosed fences and tags, brace and backslash floods, tag soup) while
   ``sys.monitoring`` counts the lines and calls the project's reward code executes.
   Counting is deterministic (a loaded machine gives the same numbers), and it sees
   quadratic Python loops; what it cannot see is work inside one C call, which on model
   output could only be a backtracking regular expression, so any regex call made by the
   reward code on these inputs fails the test outright. (The previous parsers fail both
   ways: the lenient format check was a backtracking regex, ``\\boxed{`` matching a
   Python loop per opening brace.)
2. **A budget around every reward**: plug-ins that hang in Python and in C (a
   catastrophic regex, which no signal interrupts) score 0 for that sample, are counted
   as timeouts, and leave the other samples and rewards alone.
3. **Clean exit**: a process whose scoring workers were killed after timeouts, with large
   samples in flight, exits without waiting on any of them and leaves no process behind.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from r1mega.rewards import (
    AccuracyReward,
    FormatReward,
    LanguageReward,
    Reward,
    RewardFunction,
    RewardInput,
    RewardResult,
    extract_program,
    outputs_match,
    register_reward,
)
from tests.distributed import ROOT

PROJECT_CODE = str(ROOT / "r1mega")
KB = 1024


def _repeat(unit: str, size: int) -> str:
    return unit * (size // len(unit) + 1)


def _tag_soup(size: int) -> str:
    rng = random.Random(size)
    parts = ["<think>", "</think>", "<answer>", "</answer>", "\\boxed{", "{", "}", "\\",
             "```", "```python\n", "\n", "x", "中", "²", " "]
    out, n = [], 0
    while n < size:
        out.append(rng.choice(parts))
        n += len(out[-1])
    return "".join(out)


# name -> response of about ``size`` characters
ADVERSARIAL: dict[str, Callable[[int], str]] = {
    "think_answer_no_close": lambda n: _repeat("<think></think><answer>", n),
    "unclosed_boxed": lambda n: "<answer>" + _repeat("\\boxed{", n) + "</answer>",
    "boxed_then_braces": lambda n: "<answer>\\boxed{" + _repeat("{}", n) + "</answer>",
    "open_braces": lambda n: "<answer>\\boxed{1}" + "{" * n + "</answer>",
    "backslashes": lambda n: "<answer>" + "\\" * n + "\\boxed{2}</answer>",
    "think_tags": lambda n: _repeat("<think>", n),
    "answer_tags": lambda n: _repeat("<answer>", n) + _repeat("</answer>", n // 2),
    "fences": lambda n: "<answer>" + _repeat("```", n) + "</answer>",
    "fence_info_no_newline": lambda n: "<answer>```python" + "a" * n + "</answer>",
    "tag_soup": _tag_soup,
    "mixed_script": lambda n: "<think>" + _repeat("a中1²b ", n) + "</think><answer>1</answer>",
}


def equal(gold: str, pred: str) -> bool:
    """``verify_fn`` for the bounds test: no math-verify (not the project's code)."""
    return gold == pred


class WorkLimitExceeded(Exception):
    pass


class _WorkCounter:
    """Counts LINE and CALL events in the project's code; records regex calls made there.
    Stops the measured call (raises :class:`WorkLimitExceeded`) past ``limit`` events, so
    quadratic code fails fast instead of running for minutes under the profiler."""

    TOOL = sys.monitoring.PROFILER_ID

    def __init__(self) -> None:
        self.events = 0
        self.limit = 0
        self.regex_calls: list[str] = []

    def _tick(self) -> None:
        self.events += 1
        if self.events > self.limit:
            raise WorkLimitExceeded(f"more than {self.limit} events")

    def _ours(self, code: object) -> bool:
        return getattr(code, "co_filename", "").startswith(PROJECT_CODE)

    def _line(self, code: object, line: int) -> object:
        if self._ours(code):
            self._tick()
            return None
        return sys.monitoring.DISABLE

    def _call(self, code: object, offset: int, callable_: object, arg0: object) -> None:
        if not self._ours(code):
            return
        self._tick()
        name = getattr(callable_, "__qualname__", "")
        if name.startswith("Pattern.") or (getattr(callable_, "__module__", "") == "re"
                                           and name in ("match", "search", "fullmatch",
                                                        "findall", "finditer", "sub",
                                                        "split")):
            self.regex_calls.append(name)

    def count(self, fn: Callable[[], object], limit: int) -> int:
        mon = sys.monitoring
        mon.use_tool_id(self.TOOL, "r1mega-work-counter")
        try:
            mon.register_callback(self.TOOL, mon.events.LINE, self._line)
            mon.register_callback(self.TOOL, mon.events.CALL, self._call)
            mon.set_events(self.TOOL, mon.events.LINE | mon.events.CALL)
            self.events, self.limit = 0, limit
            fn()
            return self.events
        finally:
            mon.set_events(self.TOOL, 0)
            mon.register_callback(self.TOOL, mon.events.LINE, None)
            mon.register_callback(self.TOOL, mon.events.CALL, None)
            mon.free_tool_id(self.TOOL)
            mon.restart_events()


def _scorers() -> dict[str, tuple[Callable[[str], object], tuple[str, ...]]]:
    """Each reward's scoring (in this process, as a scoring worker runs it) and the
    families aimed at its parsers; every reward also gets the tag soup."""
    strict, lenient = FormatReward({}), FormatReward({"mode": "lenient"})
    language = LanguageReward({"target": "en"})
    accuracy = AccuracyReward({"verify_fn": "tests.test_reward_bounds:equal"})
    accuracy.prepare_worker(0)  # as in a scoring worker
    tags = ("think_answer_no_close", "think_tags", "answer_tags")
    braces = ("unclosed_boxed", "boxed_then_braces", "open_braces", "backslashes")
    fences = ("fences", "fence_info_no_newline")
    return {
        "format_strict": (lambda r: strict.score(RewardInput("q", r)), tags),
        "format_lenient": (lambda r: lenient.score(RewardInput("q", r)), tags),
        "language": (lambda r: language.score(RewardInput("q", r)),
                     ("mixed_script", "think_tags")),
        "accuracy": (lambda r: accuracy.score(RewardInput("q", r, "1")), tags + braces),
        "code_parsing": (lambda r: (extract_program(r), outputs_match(r, r[::-1])),
                         fences + ("answer_tags",)),
    }


def test_adversarial_responses_take_linear_work() -> None:
    counter = _WorkCounter()
    per_char: dict[tuple[str, str], float] = {}
    for name, (score, families) in _scorers().items():
        for family in (*families, "tag_soup"):
            small, large = ADVERSARIAL[family](25 * KB), ADVERSARIAL[family](100 * KB)
            n_small = counter.count(lambda s=score, t=small: s(t), 100 * len(small))
            n_large = counter.count(lambda s=score, t=large: s(t), 100 * len(large))
            # Four times the input, at most four times the work (plus a constant).
            assert n_large <= 4.4 * n_small + 200, (name, family, n_small, n_large)
            per_char[(name, family)] = n_large / len(large)
    assert counter.regex_calls == [], f"regexes applied to model output: {counter.regex_calls}"
    worst = max(per_char, key=per_char.get)
    # A Python loop over the special characters costs about a dozen events per character
    # (measured: at most 12.5, for brace matching on "{}" * n); quadratic work on 100 KB
    # would be thousands.
    assert per_char[worst] <= 20, (worst, per_char[worst])


# ---------------------------------------------------------------------- budgets

HANG = "HANG"


@register_reward("test_hang_in_python")
class HangInPython(Reward):
    def score(self, sample: RewardInput) -> RewardResult:
        while sample.response == HANG:
            pass
        return RewardResult(1.0)


@register_reward("test_hang_in_c")
class HangInC(Reward):
    """A catastrophically backtracking regex: one C call that no signal interrupts."""

    def score(self, sample: RewardInput) -> RewardResult:
        if sample.response == HANG:
            re.fullmatch(r"(a|aa)+$", "a" * 5000 + "b")
        return RewardResult(1.0)


def test_every_reward_runs_under_a_time_budget() -> None:
    specs = [{"name": "format"}, {"name": "test_hang_in_python"}, {"name": "test_hang_in_c"},
             {"name": "language", "params": {"target": "en"}}]
    batch = [RewardInput("q", "<think>ok</think><answer>1</answer>"),
             RewardInput("q", HANG), RewardInput("q", "<think>fine</think>")]
    with RewardFunction.from_config({"specs": specs, "timeout_s": 1.0, "workers": 2}) as fn:
        out = fn.evaluate(batch)
        assert out.scores["format"] == [1.0, 0.0, 0.0]
        assert out.scores["language"] == [1.0, 0.0, 1.0]
        for name in ("test_hang_in_python", "test_hang_in_c"):
            assert out.scores[name] == [1.0, 0.0, 1.0]
            assert out.infos[name][1]["timeout"] is True
        stats = fn.stats()
        assert stats["test_hang_in_python/timeouts"] == 1
        assert stats["test_hang_in_c/timeouts"] == 1
        assert stats["format/timeouts"] == 0 and stats["language/timeouts"] == 0
        assert stats["workers/restarts"] == 2
        assert fn.evaluate(batch[:1]).total == [4.0]  # the replaced workers score on


def _marked(marker: str) -> list[int]:
    """Live processes whose environment holds ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker.encode() not in f.read():
                    continue
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        found.append(int(entry))
    return found


def test_interpreter_exits_after_timeouts_and_leaves_nothing_behind(tmp_path: Path) -> None:
    marker = f"R1MEGA_TEST_MARKER={uuid.uuid4().hex}"
    key, value = marker.split("=")
    script = tmp_path / "score_and_exit.py"
    script.write_text(
        "import time\n"
        "from r1mega.rewards import (Reward, RewardFunction, RewardInput, RewardResult,\n"
        "                            register_reward)\n"
        "@register_reward('sleepy')\n"
        "class Sleepy(Reward):\n"
        "    def score(self, sample):\n"
        "        if sample.response == 'HANG':\n"
        "            time.sleep(600)\n"
        "        return RewardResult(1.0)\n"
        "if __name__ == '__main__':\n"
        "    pad = 'x' * 200_000  # large jobs: more than a pipe buffer\n"
        "    fn = RewardFunction.from_config({'specs': [{'name': 'sleepy'}], 'workers': 2,\n"
        "                                     'timeout_s': 1})\n"
        "    batch = [RewardInput(pad, r, metadata={'pad': pad}) for r in ['HANG', 'a', 'b']]\n"
        "    total, _ = fn(batch)\n"
        "    print('scored', total, fn.stats()['workers/restarts'], flush=True)\n"
        "    # no close(): exiting must not wait on the killed or the live workers\n")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{tmp_path}", key: value}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scored [0.0, 1.0, 1.0] 1" in proc.stdout
    deadline = time.monotonic() + 10.0  # SIGKILLed workers are reaped asynchronously
    while _marked(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _marked(marker) == []


@pytest.mark.parametrize("answer", ["1", "x" * 3000])
def test_long_answers_never_reach_the_verifier(answer: str) -> None:
    reward = AccuracyReward({"verify_fn": "tests.test_reward_bounds:equal"})
    reward.prepare_worker(0)
    result = reward.score(RewardInput("q", f"<answer>{answer}</answer>", answer))
    assert (result.score, result.info.get("answer_too_long")) == (
        (1.0, None) if len(answer) < 2000 else (0.0, True))
