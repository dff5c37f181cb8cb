"""``format``: does the response follow the R1-Zero ``<think>...</think><answer>...</answer>``
layout? Scores 1.0 or 0.0.

* ``mode: strict`` (default) -- the whole response (surrounding whitespace aside) is one
  think block followed by one answer block and nothing else:
  ``^<think>\\n?.*?\\n?</think>\\s*<answer>.*?</answer>$`` (DOTALL), and each of the four
  tags occurs exactly once. The tag count matters: a lazy ``.*?`` anchored at both ends
  would otherwise happily swallow a second ``</think>`` or ``<answer>`` into a block, and
  rewarding two answer blocks invites the policy to hedge.
* ``mode: lenient`` -- somewhere in the response a ``<think>...</think>`` is followed later
  by an ``<answer>...</answer>``; text around or between them is allowed.

``prompt_ends_with_think: true`` prepends ``<think>`` before checking, for templates such
as R1-Zero's that end with ``Assistant: <think>`` so the response starts inside the block.

Surrounding whitespace is stripped because detokenizers commonly add a leading space or a
trailing newline, which says nothing about whether the policy learned the format.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from r1mega.rewards.base import Reward, RewardInput, RewardResult
from r1mega.rewards.extract import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN
from r1mega.rewards.registry import register_reward

__all__ = ["FormatReward", "format_ok"]

STRICT_RE = re.compile(r"<think>\n?.*?\n?</think>\s*<answer>.*?</answer>", re.DOTALL)
LENIENT_RE = re.compile(r"<think>.*?</think>.*?<answer>.*?</answer>", re.DOTALL)
_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)


def format_ok(
    response: str,
    *,
    mode: Literal["strict", "lenient"] = "strict",
    prompt_ends_with_think: bool = False,
) -> bool:
    """Whether ``response`` has the R1 think/answer layout (see the module docstring)."""
    text = (THINK_OPEN + response) if prompt_ends_with_think else response
    if mode == "lenient":
        return LENIENT_RE.search(text) is not None
    text = text.strip()
    if any(text.count(tag) != 1 for tag in _TAGS):
        return False
    return STRICT_RE.fullmatch(text) is not None


@register_reward("format")
class FormatReward(Reward):
    """1.0 if the response has the think/answer layout, else 0.0."""

    @dataclass
    class Params:
        mode: Literal["strict", "lenient"] = "strict"
        prompt_ends_with_think: bool = False

    def __init__(self, params: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)

    def __call__(self, samples: Sequence[RewardInput]) -> list[RewardResult]:
        p = self.params
        return [
            RewardResult(
                1.0
                if format_ok(
                    s.response, mode=p.mode, prompt_ends_with_think=p.prompt_ends_with_think
                )
                else 0.0
            )
            for s in samples
        ]
