"""Prompts from several sources in fixed proportions (DeepSeek-R1's second RL stage).

The second RL stage trains on a mix: reasoning prompts judged by rule rewards and general
prompts judged by a reward model. Each step draws ``rollout.prompts_per_step`` prompts,
split over the sources by their ``weight`` (largest-remainder rounding, so the split is
the same every step and sums exactly), each source with its own resumable
:class:`~r1mega.data.prompts.PromptSampler`. Every example carries its source's name and
reward kind in ``metadata`` (``source``, ``reward_kind``), which the reward step and the
per-source metrics read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from r1mega.data.prompts import PromptDataset, PromptExample, PromptSampler
from r1mega.data.tasks import builtin_dataset, is_builtin

REWARD_KINDS = ("rules", "reward_model")


def load_source_examples(path: str, reward: str, prompt_field: str,
                         answer_field: str | None, seed: int) -> list[PromptExample]:
    """The prompts of one source (a JSONL/Parquet file or ``builtin:<task>``'s train split),
    for RL and rejection sampling alike: rule rewards need the reference answer, so rows
    without one are skipped; a reward model judges without one, so it is not read."""
    if is_builtin(path):
        return builtin_dataset(path, "train", seed)
    rules = reward == "rules"
    return list(PromptDataset(path, prompt_field=prompt_field,
                              answer_field=answer_field if rules else None,
                              require_answer=rules))


@dataclass
class Source:
    name: str
    examples: list[PromptExample]
    weight: float
    reward: str  # rules | reward_model


def split_by_weight(total: int, weights: Sequence[float]) -> list[int]:
    """``total`` items over ``weights`` (largest remainder; ties to the earlier source)."""
    norm = sum(weights)
    if total < 0 or norm <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"cannot split {total} prompts by weights {list(weights)}")
    exact = [total * w / norm for w in weights]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in order[:total - sum(counts)]:
        counts[i] += 1
    return counts


class MixedPromptSampler:
    """``next_batch()`` gives each step's prompts, source by source."""

    def __init__(self, sources: Sequence[Source], prompts_per_step: int, seed: int,
                 shuffle: bool = True) -> None:
        counts = split_by_weight(prompts_per_step, [s.weight for s in sources])
        self.sources = list(sources)
        self.counts = dict(zip((s.name for s in sources), counts, strict=True))
        self.samplers = {
            s.name: PromptSampler(s.examples, batch_size=n, seed=seed + 7919 * i,
                                  shuffle=shuffle)
            for i, (s, n) in enumerate(zip(sources, counts, strict=True)) if n > 0
        }

    def next_batch(self) -> list[PromptExample]:
        batch = []
        for source in self.sources:
            if source.name not in self.samplers:
                continue
            for ex in self.samplers[source.name].next_batch():
                tagged = PromptExample(index=ex.index, prompt=ex.prompt, answer=ex.answer,
                                       metadata={**ex.metadata, "source": source.name,
                                                 "reward_kind": source.reward},
                                       source=ex.source)
                batch.append(tagged)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {name: sampler.state_dict() for name, sampler in self.samplers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.samplers) - set(state)
        if missing:
            raise ValueError(f"checkpoint has no sampler state for sources {sorted(missing)}")
        for name, sampler in self.samplers.items():
            sampler.load_state_dict(state[name])
