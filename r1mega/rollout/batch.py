"""Turn sampled responses and their rewards into the trainer's :class:`RolloutBatch`."""

from __future__ import annotations

import torch

from r1mega.rollout.simple_sampler import Sample
from r1mega.training.grpo_step import RolloutBatch


def build_rollout_batch(samples: list[Sample], rewards: list[float], seq_length: int,
                        pad_id: int) -> tuple[RolloutBatch, int]:
    """Right-padded ``[B, seq_length + 1]`` tokens with the response mask on the label
    positions that predict response tokens; returns the batch and how many samples had
    to be truncated to fit ``seq_length + 1`` tokens. Samples that carry the rollout's
    MoE routing give the batch a ``[B, seq_length, moe_layers, topk]`` routing record
    (padding positions route to experts ``0..topk-1``; they never reach a loss)."""
    b = len(samples)
    tokens = torch.full((b, seq_length + 1), pad_id, dtype=torch.long)
    mask = torch.zeros(b, seq_length)
    rollout_logp = torch.zeros(b, seq_length)
    truncated = 0
    for i, s in enumerate(samples):
        ids = (s.prompt_ids + s.response_ids)[: seq_length + 1]
        truncated += len(s.prompt_ids) + len(s.response_ids) > seq_length + 1
        tokens[i, :len(ids)] = torch.tensor(ids)
        start = len(s.prompt_ids) - 1  # label j predicts token j + 1
        end = len(ids) - 1
        if end > start:
            mask[i, start:end] = 1.0
            rollout_logp[i, start:end] = torch.tensor(s.logprobs[: end - start])
    return RolloutBatch(tokens=tokens, response_mask=mask,
                        rewards=torch.tensor(rewards, dtype=torch.float32),
                        rollout_logprobs=rollout_logp,
                        routing=_routing(samples, seq_length)), truncated


def _routing(samples: list[Sample], seq_length: int) -> torch.Tensor | None:
    records = [s.routing for s in samples]
    if all(r is None for r in records):
        return None
    if any(r is None for r in records):
        raise ValueError("some samples carry MoE routing and some do not")
    layers, topk = records[0].shape[1:]
    routing = torch.arange(topk, dtype=records[0].dtype).expand(
        len(samples), seq_length, layers, topk).clone()
    for i, record in enumerate(records):
        n = min(record.shape[0], seq_length)
        routing[i, :n] = record[:n]
    return routing
