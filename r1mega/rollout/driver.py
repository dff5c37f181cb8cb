"""Sample groups of responses for a batch of prompts and score them, on every rank.

Shared by training (G samples per prompt for GRPO) and evaluation (k samples per prompt
for pass@1, one greedy sample for accuracy). Rows are split over DP ranks; each DP rank
samples its share and the results are all-gathered, so every rank returns the same
global list. Rewards are computed on global rank 0 and broadcast.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from r1mega.data.prompts import PromptExample
from r1mega.data.templates import apply_template
from r1mega.rollout.simple_sampler import Sample, SamplingParams, generate


def request_seed(seed: int, step: int, row: int) -> int:
    """A request's sampling seed: a function of (run seed, step, row) only, so samples do
    not depend on the layout, batch neighbours or a restart."""
    return (seed * 1_000_003 + step * 10_007 + row) % (2**63)


def sample_groups(policy: Any, tokenizer: Any, examples: list[PromptExample],
                  group_size: int, params: SamplingParams, template: str,
                  stop: list[str], seed: int, step: int, dp_size: int
                  ) -> tuple[list[Sample], list[PromptExample]]:
    """``group_size`` responses per prompt (prompt-major rows); returns (samples, rows)."""
    from megatron.core import parallel_state as ps

    rows = [ex for ex in examples for _ in range(group_size)]
    if len(rows) % dp_size:
        raise ValueError(f"{len(rows)} samples do not split over {dp_size} DP ranks")
    prompt_ids = [tokenizer.encode(apply_template(template, ex.prompt, tokenizer))
                  for ex in rows]
    per_rank = len(rows) // dp_size
    dp_rank = ps.get_data_parallel_rank()
    mine = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    seeds = [request_seed(seed, step, r) for r in range(len(rows))][mine]
    stops = [tokenizer.encode(s) for s in stop]
    # One microbatch per DP rank: the sampler holds no KV cache, and fewer, larger
    # forward passes pay the pipeline's per-microbatch overhead once per token.
    local = generate(policy, prompt_ids[mine], params, seeds, micro_batch_size=per_rank,
                     stop_sequences=stops)
    gathered: list[Any] = [None] * dp_size
    dist.all_gather_object(gathered, local, group=ps.get_data_parallel_group())
    return [s for part in gathered for s in part], rows


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
