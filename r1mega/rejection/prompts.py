"""The prompts of a rejection-sampling run, each with the way its samples are judged.

DeepSeek-R1 rejection-samples reasoning prompts, whose answers the rule rewards verify,
and general prompts, which only a reward model can judge. Each prompt therefore carries a
*reward kind*: ``rules`` or ``reward_model``. Where the prompts come from, first match:

1. ``sample.prompts_path``: one file (JSONL/Parquet) or ``builtin:<task>``, rule-scored;
2. ``data.sources``: every source in order, each with its own ``reward`` kind and fields;
3. ``data.train_path``: rule-scored, like the RL run that produced the checkpoint.

A prompt's ``index`` is its position in this concatenated list. Resuming keys on it, so
the list must be the same on every start (the run's manifest checks the sizes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from r1mega.config.validate import ConfigError
from r1mega.data.prompts import PromptExample
from r1mega.data.sources import load_source_examples
from r1mega.rejection.filtering import REWARD_KINDS, RULES

DEFAULT_SOURCE = "prompts"


@dataclass(frozen=True)
class PromptSource:
    """One place prompts come from and how their samples are scored."""

    name: str
    path: str
    kind: str  # rules | reward_model
    prompt_field: str
    answer_field: str | None


@dataclass(frozen=True)
class SamplingPrompt:
    """A prompt of the run: its global index, the example read from disk, its source."""

    index: int
    example: PromptExample
    kind: str
    source: str  # PromptSource.name


def prompt_sources(cfg: Any) -> list[PromptSource]:
    """The configured sources, by the precedence in the module docstring."""
    data = cfg.data
    if cfg.sample.prompts_path:
        return [PromptSource(DEFAULT_SOURCE, str(cfg.sample.prompts_path), RULES,
                             data.prompt_field, data.answer_field)]
    if data.sources:
        sources = []
        for i, src in enumerate(data.sources):
            if src.reward not in REWARD_KINDS:
                raise ConfigError(f"data.sources[{i}].reward={src.reward} is not one of: "
                                  + ", ".join(REWARD_KINDS))
            sources.append(PromptSource(src.name, str(src.path), src.reward,
                                        src.prompt_field or data.prompt_field,
                                        src.answer_field or data.answer_field))
        return sources
    if data.train_path:
        return [PromptSource(DEFAULT_SOURCE, str(data.train_path), RULES, data.prompt_field,
                             data.answer_field)]
    raise ConfigError("no prompts to sample from: set sample.prompts_path, data.sources or "
                      "data.train_path")


def load_prompts(cfg: Any) -> list[SamplingPrompt]:
    """Every prompt of the run, in index order (deterministic: same on every rank), the
    first ``sample.max_prompts`` of each source when that is set."""
    prompts: list[SamplingPrompt] = []
    limit = cfg.sample.max_prompts
    for source in prompt_sources(cfg):
        examples = load_source_examples(source.path, source.kind, source.prompt_field,
                                        source.answer_field, cfg.train.seed)
        for example in examples[:limit]:
            prompts.append(SamplingPrompt(len(prompts), example, source.kind, source.name))
    return prompts
