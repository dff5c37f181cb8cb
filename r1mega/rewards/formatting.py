"""``format``: does the response follow the R1-Zero ``<think>...</think><answer>...</answer>``
layout? Scores 1.0 or 0.0.

* ``mode: strict`` (default) -- the whole response (surrounding whitespace aside) is one
  think block followed by one answer block and nothing else: it starts with ``<think>``,
  ends with ``</answer>``, only whitespace lies between ``</think>`` and ``<answer>``, and
  each of the four tags occurs exactly once. The tag count matters: rewarding two answer
  blocks invites the policy to hedge.
* ``mode: lenient`` -- somewhere in the response a ``<think>...</think>`` is followed later
  by an ``<answer>...</answer>``; text around or between them is allowed.

Both are decided by a few linear ``str.find`` / ``str.count`` scans. (The lenient check
used to be the pattern ``<think>.*?</think>.*?<answer>.*?</answer>``, which backtracks
cubically: 11 s on 4.6 KB of ``"<think></think><answer>" * n``.) Taking the earliest
``<think>``, then the earliest ``</think>`` after it, and so on, finds a match whenever
any exists: each earliest choice leaves at least as much text for the next tag.

``prompt_ends_with_think: true`` prepends ``<think>`` before checking, for templates such
as R1-Zero's that end with ``Assistant: <think>`` so the response starts inside the block.

Surrounding whitespace is stripped because detokenizers commonly add a leading space or a
trailing newline, which says nothing about whether the policy learned the format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from r1mega.rewards.base import Reward, RewardInput, RewardResult
from r1mega.rewards.extract import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN
from r1mega.rewards.registry import register_reward

__all__ = ["FormatReward", "format_ok"]

_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)


def _strict_ok(text: str) -> bool:
    text = text.strip()
    if any(text.count(tag) != 1 for tag in _TAGS):
        return False
    if not (text.startswith(THINK_OPEN) and text.endswith(ANSWER_CLOSE)):
        return False
    think_close = text.find(THINK_CLOSE)
    answer_open = text.find(ANSWER_OPEN)
    if not len(THINK_OPEN) <= think_close < answer_open:
        return False
    return text[think_close + len(THINK_CLOSE) : answer_open].strip() == ""


def _lenient_ok(text: str) -> bool:
    pos = 0
    for tag in _TAGS:
        found = text.find(tag, pos)
        if found < 0:
            return False
        pos = found + len(tag)
    return True


def format_ok(
    response: str,
    *,
    mode: Literal["strict", "lenient"] = "strict",
    prompt_ends_with_think: bool = False,
) -> bool:
    """Whether ``response`` has the R1 think/answer layout (see the module docstring)."""
    text = (THINK_OPEN + response) if prompt_ends_with_think else response
    return _lenient_ok(text) if mode == "lenient" else _strict_ok(text)


@register_reward("format")
class FormatReward(Reward):
    """1.0 if the response has the think/answer layout, else 0.0."""

    @dataclass
    class Params:
        mode: Literal["strict", "lenient"] = "strict"
        prompt_ends_with_think: bool = False

    def __init__(self, params: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)

    def score(self, sample: RewardInput) -> RewardResult:
        p = self.params
        ok = format_ok(sample.response, mode=p.mode,
                       prompt_ends_with_think=p.prompt_ends_with_think)
        return RewardResult(1.0 if ok else 0.0)
