"""Sample groups of responses for a batch of prompts and score them, on every rank.

Shared by training (G samples per prompt for GRPO) and evaluation (k samples per prompt
for pass@1, one greedy sample for accuracy). A *sampler* turns prompts into samples on
every rank: the colocated rollout engine (:class:`~r1mega.rollout.colocated.
ColocatedRollout`, the default) or the simple training-layout sampler
(:class:`TrainingLayoutSampler`, the reference). Rewards are computed on global rank 0
and broadcast.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist

from r1mega.data.prompts import PromptExample
from r1mega.data.templates import apply_template
from r1mega.rollout.types import Sample, SamplingParams


class Sampler(Protocol):
    """What training, evaluation, ``r1mega sample`` and ``generate`` ask of a sampler."""

    #: The last :meth:`generate` call's metrics (timings, engine counters, memory).
    metrics: dict[str, float]

    def describe(self) -> str:
        """One line naming the sampler and its layout, for the job's start-up log."""
        ...

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams,
                 seeds: Sequence[int], stop: Sequence[str],
                 decode: Callable[[list[int]], str] | None) -> list[Sample]:
        """One sample per prompt (collective; every rank passes all rows and gets all
        samples). ``params.max_new_tokens`` may grow from call to call."""
        ...

    def held_metrics(self, phase: str) -> dict[str, float]:
        """Device memory the sampler's side of the job holds now, as
        ``memory/<phase>/*`` metrics (empty when it keeps nothing of its own)."""
        ...


class TrainingLayoutSampler:
    """The policy samples in its training layout with the simple (no KV cache) sampler.

    Rows are split over the training layout's DP ranks, each samples its share, and the
    results are all-gathered. Stop strings are matched on token ids.
    """

    def __init__(self, policy: Any, tokenizer: Any) -> None:
        self.policy = policy
        self.tokenizer = tokenizer
        self.metrics: dict[str, float] = {}

    def describe(self) -> str:
        return "training-layout sampler (no KV cache)"

    def held_metrics(self, phase: str) -> dict[str, float]:
        return {}

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams,
                 seeds: Sequence[int], stop: Sequence[str],
                 decode: Callable[[list[int]], str] | None) -> list[Sample]:
        from megatron.core import parallel_state as ps

        from r1mega.rollout.simple_sampler import generate

        dp_size = ps.get_data_parallel_world_size()
        if len(prompts) % dp_size:
            raise ValueError(f"{len(prompts)} samples do not split over {dp_size} DP ranks")
        per_rank = len(prompts) // dp_size
        mine = slice(ps.get_data_parallel_rank() * per_rank,
                     (ps.get_data_parallel_rank() + 1) * per_rank)
        stops = [self.tokenizer.encode(s) for s in stop]
        # One microbatch per DP rank: the sampler holds no KV cache, and fewer, larger
        # forward passes pay the pipeline's per-microbatch overhead once per token.
        local = generate(self.policy, list(prompts[mine]), params, list(seeds[mine]),
                         micro_batch_size=per_rank, stop_sequences=stops)
        gathered: list[Any] = [None] * dp_size
        dist.all_gather_object(gathered, local, group=ps.get_data_parallel_group())
        return [s for part in gathered for s in part]


def request_seed(seed: int, step: int, row: int) -> int:
    """A request's sampling seed: a function of (run seed, step, row) only, so samples do
    not depend on the layout, batch neighbours or a restart."""
    return (seed * 1_000_003 + step * 10_007 + row) % (2**63)


def sample_groups(sampler: Sampler, tokenizer: Any, examples: list[PromptExample],
                  group_size: int, params: SamplingParams, template: str,
                  stop: list[str], seed: int, step: int
                  ) -> tuple[list[Sample], list[PromptExample]]:
    """``group_size`` responses per prompt (prompt-major rows); returns (samples, rows)."""
    rows = [ex for ex in examples for _ in range(group_size)]
    prompt_ids = [tokenizer.encode(apply_template(template, ex.prompt, tokenizer))
                  for ex in rows]
    seeds = [request_seed(seed, step, r) for r in range(len(rows))]
    samples = sampler.generate(prompt_ids, params, seeds, stop, tokenizer.decode)
    return samples, rows


def score(reward_fn: Any, tokenizer: Any, samples: list[Sample], rows: list[PromptExample],
          reward_model: Any = None) -> tuple[torch.Tensor, dict[str, list[float]],
                                             dict[str, float]]:
    """Rewards of every sample, on every rank.

    Rows whose ``metadata["reward_kind"]`` is ``reward_model`` are scored by
    ``reward_model`` (collective, all ranks); the others by the rule rewards on global
    rank 0, then broadcast. Returns (total reward per sample, {rule reward name: scores of
    the rule-scored rows}, {source name: mean total reward} for rows that name a source).
    """
    from r1mega.rewards import RewardInput

    by_model = [i for i, ex in enumerate(rows)
                if ex.metadata.get("reward_kind") == "reward_model"]
    model_scored = set(by_model)
    by_rules = [i for i in range(len(rows)) if i not in model_scored]
    total = torch.zeros(len(samples))
    per_reward: dict[str, list[float]] = {}
    if dist.get_rank() == 0 and by_rules:
        inputs = [RewardInput(prompt=rows[i].prompt,
                              response=tokenizer.decode(samples[i].response_ids),
                              answer=rows[i].answer, metadata=dict(rows[i].metadata),
                              source=rows[i].source)
                  for i in by_rules]
        rule_total, per_reward = reward_fn(inputs)
        total[by_rules] = torch.tensor(rule_total, dtype=torch.float32)
    holder = [per_reward]
    dist.broadcast(total, src=0)
    dist.broadcast_object_list(holder, src=0)
    if by_model:
        if reward_model is None:
            raise ValueError("rows from a reward_model source but no reward model is loaded "
                             "(set rewards.reward_model.load)")
        scores = reward_model.score([rows[i].prompt for i in by_model],
                                    [tokenizer.decode(samples[i].response_ids)
                                     for i in by_model])
        total[by_model] = torch.tensor(scores, dtype=torch.float32)
    per_source: dict[str, list[float]] = {}
    for i, ex in enumerate(rows):
        if "source" in ex.metadata:
            per_source.setdefault(ex.metadata["source"], []).append(float(total[i]))
    return total, holder[0], {k: sum(v) / len(v) for k, v in per_source.items()}


def build_sampler(cfg: Any, policy: Any, optimizer: Any | None, tokenizer: Any) -> Sampler:
    """The sampler ``rollout.engine`` asks for (collective)."""
    if cfg.rollout.engine == "simple":
        return TrainingLayoutSampler(policy, tokenizer)
    from r1mega.rollout.colocated import ColocatedRollout

    return ColocatedRollout(cfg, policy, optimizer)
