"""Which of one prompt's samples become SFT rows, and why each other one does not.

Every sample gets exactly one outcome, so the statistics add up (generated = kept + all
dropped). The checks run in a fixed order and the first failing one names the reason:

1. correctness: the rule reward (``rules`` prompts) must reach ``sample.min_reward``, the
   reward model's score (``reward_model`` prompts) ``sample.reward_model_threshold``;
   a NaN score never passes;
2. readability (:func:`r1mega.data.readability.rejection_reason`): one reason each for
   empty, no think block, no summary, mixed language, too long;
3. ``duplicate``: the same response text as a sample of this prompt already kept
   (``sample.dedupe``); an unreadable copy was already dropped for being unreadable;
4. ``over_cap``: the prompt already has ``sample.max_kept_per_prompt`` rows. Applied
   last, so the cap keeps the first accepted, distinct samples in seed order and the
   result does not depend on anything but the samples themselves.

Nothing here touches torch or the filesystem: it is the part of rejection sampling whose
rules a reader (and a test) can check against each row of the dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from r1mega.data.readability import REASONS as READABILITY_REASONS
from r1mega.data.readability import rejection_reason
from r1mega.data.sources import REWARD_KINDS

RULES, REWARD_MODEL = REWARD_KINDS  # "rules", "reward_model" (data.sources[i].reward)

LOW_REWARD = "low_reward"  # rule reward below sample.min_reward
LOW_REWARD_MODEL_SCORE = "low_reward_model_score"  # below sample.reward_model_threshold
DUPLICATE = "duplicate"
OVER_CAP = "over_cap"
DROP_REASONS = (LOW_REWARD, LOW_REWARD_MODEL_SCORE, *READABILITY_REASONS, DUPLICATE, OVER_CAP)


@dataclass(frozen=True)
class Candidate:
    """One sampled response of a prompt, decoded and scored."""

    response: str
    num_tokens: int
    score: float  # rule reward total, or the reward model's score


@dataclass(frozen=True)
class FilterSettings:
    """The ``sample`` section's filtering knobs, detached from omegaconf."""

    min_reward: float
    reward_model_threshold: float
    readability: Any  # ReadabilityConfig (dataclass or omegaconf node)
    dedupe: bool = True
    max_kept_per_prompt: int | None = None

    @classmethod
    def from_config(cls, sample_cfg: Any) -> FilterSettings:
        return cls(min_reward=float(sample_cfg.min_reward),
                   reward_model_threshold=float(sample_cfg.reward_model_threshold),
                   readability=sample_cfg.readability, dedupe=bool(sample_cfg.dedupe),
                   max_kept_per_prompt=sample_cfg.max_kept_per_prompt)

    def threshold(self, kind: str) -> float:
        """The score a sample of a ``kind`` prompt must reach."""
        if kind == RULES:
            return self.min_reward
        if kind == REWARD_MODEL:
            return self.reward_model_threshold
        raise ValueError(f"unknown reward kind {kind!r}: expected one of {REWARD_KINDS}")


def sample_rejection(candidate: Candidate, kind: str, settings: FilterSettings) -> str | None:
    """Why one sample fails on its own (score, then readability), or ``None``.

    Duplicates and the per-prompt cap depend on the other samples; see :func:`select`."""
    if not candidate.score >= settings.threshold(kind):  # NaN fails too
        return LOW_REWARD if kind == RULES else LOW_REWARD_MODEL_SCORE
    return rejection_reason(candidate.response, candidate.num_tokens, settings.readability)


def select(candidates: Sequence[Candidate], kind: str,
           settings: FilterSettings) -> list[str | None]:
    """One outcome per candidate, in order: ``None`` (kept) or a reason of
    :data:`DROP_REASONS`."""
    outcomes: list[str | None] = []
    kept_texts: set[str] = set()
    kept = 0
    for candidate in candidates:
        reason = sample_rejection(candidate, kind, settings)
        if reason is None and settings.dedupe and candidate.response in kept_texts:
            reason = DUPLICATE
        if reason is None and settings.max_kept_per_prompt is not None \
                and kept >= settings.max_kept_per_prompt:
            reason = OVER_CAP
        if reason is None:
            kept_texts.add(candidate.response)
            kept += 1
        outcomes.append(reason)
    return outcomes
