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
    metrics: dict[str, float]

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams,
                 seeds: Sequence[int], stop: Sequence[str],
                 decode: Callable[[list[int]], str] | None) -> list[Sample]: ...


class TrainingLayoutSampler:
    """The policy samples in its training layout with the simple (no KV cache) sampler.

    Rows are split over the training layout's DP ranks, each samples its share, and the
    results are all-gathered. Stop strings are matched on token ids.
    """

    def __init__(self, policy: Any, tokenizer: Any) -> None:
        self.policy = policy
        self.tokenizer = tokenizer
        self.metrics: dict[str, float] = {}

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


def score(reward_fn: Any, tokenizer: Any, samples: list[Sample], rows: list[PromptExample]
          ) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """(total reward per sample, {reward name: per-sample scores}) on every rank."""
    from r1mega.rewards import RewardInput

    payload = torch.zeros(len(samples))
    per_reward: dict[str, list[float]] = {}
    if dist.get_rank() == 0:
        inputs = [RewardInput(prompt=ex.prompt, response=tokenizer.decode(s.response_ids),
                              answer=ex.answer, metadata=dict(ex.metadata))
                  for s, ex in zip(samples, rows, strict=True)]
        total, per_reward = reward_fn(inputs)
        payload = torch.tensor(total, dtype=torch.float32)
    holder = [per_reward]
    dist.broadcast(payload, src=0)
    dist.broadcast_object_list(holder, src=0)
    return payload, holder[0]


def build_sampler(cfg: Any, policy: Any, optimizer: Any | None, tokenizer: Any) -> Sampler:
    """The sampler ``rollout.engine`` asks for (collective)."""
    if cfg.rollout.engine == "simple":
        return TrainingLayoutSampler(policy, tokenizer)
    from r1mega.rollout.colocated import ColocatedRollout

    return ColocatedRollout(cfg, policy, optimizer)
