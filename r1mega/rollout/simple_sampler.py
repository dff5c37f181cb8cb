"""A simple sampler: autoregressive generation with the training-layout policy.

Every new token runs a full forward pass over the sequence so far (no KV cache) through
megatron-core's pipeline schedule, so it works at any training layout (TP/PP/EP/DP)
with no extra model. It is the reference and the fallback for the colocated rollout
engine, not its replacement: decoding cost grows quadratically with length.

Each DP rank generates its own share of the rows; all ranks step together until every
row in the job is finished (MoE token dispatch is collective across EP ranks). On the
last pipeline stage the next-token logits are gathered over TP (one position per row),
sampled with a per-request generator, and broadcast to the other stages.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from r1mega.rollout.sampling import sample_tokens
from r1mega.rollout.types import Sample, SamplingParams
from r1mega.training.policy import Policy
from r1mega.training.schedule import forward_backward


def _next_token_logits(lengths: torch.Tensor, batch: dict[str, torch.Tensor],
                       logits: torch.Tensor):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    rows = torch.arange(logits.shape[0])
    last = logits[rows, batch["lengths"] - 1]  # [b, V/tp]
    batch["next_logits"] = gather_from_tensor_model_parallel_region(last.float())
    return logits.sum() * 0.0, torch.tensor(1, dtype=torch.int), {}


def _forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                 attention_mask=None)


def _ends_with_any(ids: list[int], stops: list[list[int]]) -> bool:
    return any(len(ids) >= len(s) and ids[-len(s):] == s for s in stops if s)


@torch.no_grad()
def generate(policy: Policy, prompts: list[list[int]], params: SamplingParams,
             seeds: list[int], micro_batch_size: int,
             stop_sequences: list[list[int]] | None = None) -> list[Sample]:
    """Sample one response for each prompt of *this DP rank* (call on every rank of the
    job with equal-length prompt lists per DP rank)."""
    from megatron.core import parallel_state as ps

    for chunk in policy.unwrapped():
        chunk.eval()
    b = len(prompts)
    if b % micro_batch_size:
        raise ValueError(f"{b} prompts per DP rank do not split into micro batches of "
                         f"{micro_batch_size}")
    max_len = max(len(p) for p in prompts) + params.max_new_tokens
    tokens = torch.full((b, max_len), params.pad_id, dtype=torch.long)
    lengths = torch.tensor([len(p) for p in prompts])
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    responses: list[list[int]] = [[] for _ in range(b)]
    logprobs: list[list[float]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool)
    stop_reasons = ["length"] * b
    pp_group = ps.get_pipeline_model_parallel_group()
    last_stage = dist.get_global_rank(pp_group, ps.get_pipeline_model_parallel_world_size() - 1)
    for _ in range(params.max_new_tokens):
        width = int(lengths.max())
        mbs = []
        for start in range(0, b, micro_batch_size):
            sl = slice(start, start + micro_batch_size)
            mbs.append({
                "tokens": tokens[sl, :width].contiguous(),
                "position_ids": torch.arange(width).expand(micro_batch_size, -1).contiguous(),
                "lengths": lengths[sl],
            })
        forward_backward(policy, mbs, partial(_next_token_logits, lengths), forward_only=True,
                         model_forward=_forward)
        new = torch.zeros(b, dtype=torch.long)
        new_logp = torch.zeros(b, dtype=torch.float32)
        if ps.is_pipeline_last_stage():
            logits = torch.cat([mb["next_logits"] for mb in mbs]).cpu()
            new, new_logp = sample_tokens(logits, params.temperature, params.top_k,
                                          params.top_p, generators)
        dist.broadcast(new, src=last_stage, group=pp_group)
        dist.broadcast(new_logp, src=last_stage, group=pp_group)
        for i in range(b):
            if done[i]:
                continue
            token = int(new[i])
            responses[i].append(token)
            logprobs[i].append(float(new_logp[i]))
            tokens[i, lengths[i]] = token
            lengths[i] += 1
            if token == params.eos_id:
                done[i], stop_reasons[i] = True, "eos"
            elif _ends_with_any(responses[i], stop_sequences or []):
                done[i], stop_reasons[i] = True, "stop"
        remaining = torch.tensor([int((~done).sum())])
        dist.all_reduce(remaining)
        if remaining.item() == 0:
            break
    for chunk in policy.unwrapped():
        chunk.train()
    return [Sample(prompt_ids=list(prompts[i]), response_ids=responses[i],
                   logprobs=logprobs[i], finished=bool(done[i]),
                   stop_reason=stop_reasons[i]) for i in range(b)]
