"""``accuracy``: is the final answer mathematically equal to the ground truth?

Extraction: the content of the last ``<answer>...</answer>`` block and, inside it, the last
balanced ``\\boxed{...}`` if there is one (:mod:`r1mega.rewards.extract`, linear time). A
response without an answer block scores 0 (``info={"no_answer": True}``); an answer longer
than :data:`MAX_ANSWER_CHARS` scores 0 (``answer_too_long``) without reaching the verifier,
whose parsers are regular expressions.

Both answers are normalised (:mod:`r1mega.rewards.normalize`: currency signs, digits of
other scripts, superscripts) and compared with math-verify
(``verify(parse(gold), parse(pred))``). This runs in the scoring workers
(:mod:`r1mega.rewards.runner`), for two reasons: math-verify bounds its own work with
``signal.alarm``, which only works in the main thread of a process, and an alarm cannot
interrupt C code (a huge sympy integer power, a pathological regex), so a check can hang
for good and only killing its process bounds it. A check past ``timeout_s`` scores 0 with
``{"timeout": True}``; one that raises scores 0 with ``{"error": ...}``.

A ground truth math-verify cannot parse is the data's fault, not the policy's: it scores
0 with ``{"unparsable_ground_truth": True}``, is counted, and the trainer warns once per
dataset row, naming it (``RewardInput.source``).

``params.verify_fn`` (``"module:function"``, called as ``fn(gold, pred) -> bool | float``)
replaces the math-verify check. It exists for tests (inject a hang or a crash) and for
domain-specific checkers; it must be importable in a fresh interpreter. Raising
``TimeoutError`` from it counts as a timeout.

Counters (:meth:`AccuracyReward.stats`): samples, checks, timeouts, errors, no_answer,
no_ground_truth, answer_too_long, unparsable_ground_truth.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from r1mega.rewards.base import Reward, RewardInput, RewardResult
from r1mega.rewards.extract import last_answer_block, last_boxed
from r1mega.rewards.normalize import normalize_answer
from r1mega.rewards.registry import register_reward

__all__ = [
    "MAX_ANSWER_CHARS",
    "AccuracyReward",
    "UnparsableGroundTruth",
    "extract_final_answer",
    "math_verify_check",
    "resolve_callable",
]

logger = logging.getLogger(__name__)

#: Longest final answer sent to the verifier: a number, an expression, a tuple or a small
#: matrix fit easily; a policy pasting its whole reasoning into the answer does not.
MAX_ANSWER_CHARS = 2000

VerifyFn = Callable[[str, str], Any]

_MATH_VERIFY_TIMEOUT_S = 5  # math-verify's own alarm (integer seconds), set per worker


class UnparsableGroundTruth(ValueError):
    """math-verify finds nothing it can compare in a ground-truth answer."""


def _as_math(text: str) -> str:
    """Wrap bare LaTeX in ``$...$`` so math-verify's LaTeX extractor sees it.

    Without delimiters math-verify only tries its plain-expression extractor, which reads
    ``(1, 2)`` as ``2`` and ``\\sqrt{2}`` as nothing. Text that already has math delimiters
    (or a ``\\boxed``) is passed through so its own structure is used.
    """
    text = text.strip()
    if any(tok in text for tok in ("$", "\\(", "\\[", "\\boxed", "\\fbox")):
        return text
    return f"${text}$"


def math_verify_check(gold: str, pred: str) -> bool:
    """math-verify equivalence of two answer strings (gold first: the check is asymmetric).

    Parsing timeouts raise ``TimeoutError`` so they are counted as timeouts; an unparsable
    prediction is simply not equal; an unparsable ground truth raises
    :class:`UnparsableGroundTruth`.
    """
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    def _parse(text: str) -> list[Any]:
        try:
            return parse(
                _as_math(text), parsing_timeout=_MATH_VERIFY_TIMEOUT_S, raise_on_error=True
            )
        except TimeoutException as e:
            raise TimeoutError(f"math-verify parsing timed out: {e}") from None
        except Exception:
            return []

    gold_parsed = _parse(gold)
    if not gold_parsed:
        raise UnparsableGroundTruth(f"math-verify cannot parse the ground truth {gold[:200]!r}")
    pred_parsed = _parse(pred)
    if not pred_parsed:
        return False
    try:
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=_MATH_VERIFY_TIMEOUT_S))
    except TimeoutException as e:
        raise TimeoutError(f"math-verify timed out: {e}") from None


def resolve_callable(path: str) -> VerifyFn:
    """Import ``"package.module:function"``."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected 'module:function', got {path!r}")
    module = importlib.import_module(module_name)
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"{path!r} is not callable")
    return fn  # type: ignore[return-value]


def extract_final_answer(response: str) -> str | None:
    """The last answer block's ``\\boxed{}`` content, else the whole block; None if no block."""
    block = last_answer_block(response)
    if block is None:
        return None
    boxed = last_boxed(block)
    answer = boxed if boxed is not None else block
    return answer.strip()


# Outcomes decided before the verifier runs (not counted as checks).
_UNCHECKED = ("no_answer", "no_ground_truth", "answer_too_long")


@register_reward("accuracy")
class AccuracyReward(Reward):
    """1.0 if the extracted final answer is math-verify-equal to ``sample.answer``, else 0.0."""

    @dataclass
    class Params:
        verify_fn: str | None = None  # "module:function" replacing math-verify (tests)
        timeout_s: float | None = None  # per check; None = rewards.timeout_s

    def __init__(self, params: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        p = self.params
        self.check_timeout_s = self.timeout_s if p.timeout_s is None else p.timeout_s
        if not self.check_timeout_s > 0:
            raise self.param_error("timeout_s", f"must be > 0, got {self.check_timeout_s}")
        if p.verify_fn is not None:
            try:
                resolve_callable(p.verify_fn)  # fail at start-up, not in a worker
            except (ImportError, AttributeError, ValueError) as e:
                raise self.param_error("verify_fn", f"cannot import {p.verify_fn!r}: {e}") from e
        self._verify: VerifyFn | None = None  # resolved in each worker
        self._warned_rows: set[str] = set()

    def prepare_worker(self, worker_index: int) -> None:
        global _MATH_VERIFY_TIMEOUT_S
        # Importing sympy and loading the LaTeX grammar takes seconds on a loaded machine:
        # warm up under a generous alarm, then use the configured one.
        _MATH_VERIFY_TIMEOUT_S = 120
        math_verify_check("1", "1")
        _MATH_VERIFY_TIMEOUT_S = max(1, math.ceil(self.check_timeout_s))
        fn = self.params.verify_fn
        self._verify = resolve_callable(fn) if fn else math_verify_check

    def budget_s(self, sample: RewardInput) -> float:
        return self.check_timeout_s

    def score(self, sample: RewardInput) -> RewardResult:
        if sample.answer is None or not str(sample.answer).strip():
            return RewardResult(0.0, {"error": "sample has no ground-truth answer",
                                      "no_ground_truth": True})
        pred = extract_final_answer(sample.response)
        if not pred:
            return RewardResult(0.0, {"no_answer": True})
        if len(pred) > MAX_ANSWER_CHARS:
            return RewardResult(0.0, {"answer_too_long": True})
        gold = str(sample.answer)
        if len(gold) > MAX_ANSWER_CHARS:
            return RewardResult(0.0, {"unparsable_ground_truth": True, "message":
                                      f"the ground truth is longer than {MAX_ANSWER_CHARS} "
                                      "characters"})
        verify_fn = self._verify or math_verify_check
        try:
            value = verify_fn(normalize_answer(gold), normalize_answer(pred))
        except UnparsableGroundTruth as e:
            return RewardResult(0.0, {"unparsable_ground_truth": True, "message": str(e)})
        return RewardResult(float(value), {})

    def counters(self, sample: RewardInput, result: RewardResult) -> Iterable[str]:
        flags = [k for k, v in result.info.items() if v is True and k != "timeout"]
        if not any(k in _UNCHECKED for k in flags):
            flags.append("checks")
        return flags

    def record(self, sample: RewardInput, result: RewardResult) -> None:
        super().record(sample, result)
        if result.info.get("unparsable_ground_truth") is True:
            row = sample.source or f"the row with prompt {sample.prompt[:80]!r}"
            if row not in self._warned_rows:
                self._warned_rows.add(row)
                logger.warning("accuracy: %s: %s; its samples score 0 (counted as "
                               "accuracy/unparsable_ground_truth)", row,
                               result.info.get("message", "unparsable ground truth"))

    def stats(self) -> dict[str, int]:
        base = {k: 0 for k in ("checks", *_UNCHECKED, "unparsable_ground_truth")}
        return {**base, **super().stats()}
