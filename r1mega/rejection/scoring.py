"""Scores of sampled responses: the rule rewards, or a reward model for general prompts.

Rule-scored prompts (``rules``) get the weighted sum of ``rewards.specs``, exactly what
the RL run optimised (:class:`r1mega.rewards.RewardFunction`). General prompts
(``reward_model``) have no verifiable answer and are judged by a reward model: any
object with ``score(prompts, responses)`` (:class:`RewardModelScorer`). By default that
is the reward model of ``rewards.reward_model.load`` (an HF directory or its conversion)
(:mod:`r1mega.rewards.reward_model`, as the stage-2 RL run uses); a caller may inject
another one (a remote service, or a deterministic fake in tests). Rejection sampling
only needs the scores, so nothing here depends on how they are computed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from r1mega.config.validate import ConfigError
from r1mega.rejection.filtering import REWARD_MODEL, RULES
from r1mega.rejection.prompts import SamplingPrompt, prompt_sources


@runtime_checkable
class RewardModelScorer(Protocol):
    """Scores general responses. Called on every rank of the job with the same arguments,
    once per batch (so a model-parallel reward model can run collectively); rank 0's
    scores decide. ``prompts`` are the raw prompts (no template)."""

    def score(self, prompts: list[str], responses: list[str]) -> list[float]: ...


class BatchScorer:
    """One score per sampled response of a batch, by the kind of its prompt.

    ``rules`` is ``None`` on ranks that do not compute rule rewards (all but rank 0, as in
    training); their rule-kind scores are NaN and are never used.
    """

    def __init__(self, rules: Any | None, reward_model: RewardModelScorer | None) -> None:
        self.rules = rules
        self.reward_model = reward_model

    def __call__(self, rows: Sequence[SamplingPrompt], responses: Sequence[str]) -> list[float]:
        if len(rows) != len(responses):
            raise ValueError(f"{len(rows)} prompts but {len(responses)} responses")
        scores = [math.nan] * len(rows)
        for kind, fill in ((RULES, self._rule_scores), (REWARD_MODEL, self._model_scores)):
            picked = [i for i, row in enumerate(rows) if row.kind == kind]
            if not picked:
                continue
            values = fill([rows[i] for i in picked], [responses[i] for i in picked])
            for i, value in zip(picked, values, strict=True):
                scores[i] = float(value)
        return scores

    def _rule_scores(self, rows: list[SamplingPrompt], responses: list[str]) -> list[float]:
        if self.rules is None:
            return [math.nan] * len(rows)
        from r1mega.rewards import RewardInput

        inputs = [RewardInput(prompt=row.example.prompt, response=text,
                              answer=row.example.answer, metadata=dict(row.example.metadata),
                              source=row.example.source)
                  for row, text in zip(rows, responses, strict=True)]
        total, _ = self.rules(inputs)
        return total

    def _model_scores(self, rows: list[SamplingPrompt], responses: list[str]) -> list[float]:
        if self.reward_model is None:
            raise RuntimeError("reward_model prompts in the batch but no reward-model scorer")
        scores = list(self.reward_model.score([row.example.prompt for row in rows],
                                              list(responses)))
        if len(scores) != len(rows):
            raise RuntimeError(f"the reward-model scorer returned {len(scores)} scores for "
                               f"{len(rows)} responses")
        return scores


def reward_model_sources(cfg: Any) -> list[str]:
    """Names of the prompt sources a reward model judges."""
    return [s.name for s in prompt_sources(cfg) if s.kind == REWARD_MODEL]


def check_reward_model(cfg: Any, injected: RewardModelScorer | None) -> None:
    """Fail before any model is built if reward-model prompts have no scorer to judge them."""
    judged = reward_model_sources(cfg)
    if not judged:
        return
    if injected is not None:
        if not isinstance(injected, RewardModelScorer):
            raise TypeError(f"{type(injected).__name__} has no score(prompts, responses) method")
        return
    if not cfg.rewards.reward_model.load:
        raise ConfigError(
            "data.sources " + ", ".join(judged) + " are scored by a reward model "
            "(reward: reward_model) but rewards.reward_model.load is not set: give the "
            "reward model's checkpoint, or score those sources with reward: rules")


def resolve_reward_model(cfg: Any, injected: RewardModelScorer | None, tokenizer: Any
                         ) -> RewardModelScorer | None:
    """The reward-model scorer the run needs (collective when it loads one): ``None`` when
    every source is rule-scored, else the injected one, else the reward model of
    ``rewards.reward_model.load`` (:mod:`r1mega.rewards.reward_model`), whose scores
    include ``rewards.reward_model.scale``."""
    check_reward_model(cfg, injected)
    if not reward_model_sources(cfg):
        return None
    if injected is not None:
        return injected
    from r1mega.rewards.reward_model import RewardModelScorer as MegatronRewardModel

    return MegatronRewardModel.for_job(cfg, tokenizer)
