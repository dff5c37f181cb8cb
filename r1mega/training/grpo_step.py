"""One GRPO policy update on megatron-core: logprobs, reference logprobs, loss, step.

Input is a batch of rollouts (prompt + response token ids, a response mask, rewards and
optionally the generation engine's log-probabilities). On every rank, the global batch
is split over DP ranks and microbatches; every pass goes through megatron-core's
pipeline schedules, so the same code runs at any TP/PP/EP/DP layout:

1. advantages from the rewards (group-normalised; identical on every rank);
2. reference log-probabilities: the host-held reference weights are swapped into the
   policy for a forward-only pass (see :mod:`r1mega.training.reference`);
3. old log-probabilities: on a single on-policy epoch they equal the current ones in
   value, so no extra pass runs; with ``grpo.epochs_per_step > 1`` a forward-only pass
   records them first;
4. for each epoch: forward/backward with the clipped GRPO loss (sum form, divided by the
   global count by megatron-core), gradient finalisation, clipping, optimizer step.

Log-probabilities and entropy come from vocab-parallel logits without gathering the
vocabulary (:mod:`r1mega.training.logprobs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from r1mega.algorithms import compute_advantages, kl_reward_penalty, policy_loss_terms
from r1mega.algorithms.advantages import uniform_groups
from r1mega.algorithms.policy_loss import STAT_KEYS, finalize_stats, loss_kwargs_from_config
from r1mega.training.batches import data_parallel_microbatches
from r1mega.training.logprobs import vocab_parallel_entropy, vocab_parallel_logprobs
from r1mega.training.packing import (
    pack_microbatch,
    packed_rl_forward,
    unpack_tokens,
    valid_lengths,
)
from r1mega.training.policy import Policy
from r1mega.training.reference import ReferencePolicy
from r1mega.training.routing_replay import with_routing_replay
from r1mega.training.schedule import forward_backward


@dataclass
class RolloutBatch:
    """G samples per prompt, prompts contiguous: rows ``i*G .. i*G+G-1`` form a group."""

    tokens: torch.Tensor  # [B, S+1] prompt + response (+ padding) token ids
    response_mask: torch.Tensor  # [B, S] 1 where labels (tokens[:, 1:]) are response tokens
    rewards: torch.Tensor  # [B]
    rollout_logprobs: torch.Tensor | None = None  # [B, S] from the generation engine
    # [B, S, moe_layers, topk] experts per input token chosen by the rollout engine
    # (routing replay: the policy's forward passes route by it).
    routing: torch.Tensor | None = None


def _token_view(batch: dict[str, Any], logits: torch.Tensor, temperature: float,
                with_entropy: bool) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor | None]:
    """(padded microbatch, log-probs ``[b, s]``, entropy ``[b, s]`` or None) from a stage's
    logits, for padded and packed microbatches alike: packed results are unpacked so
    per-sequence losses see the row structure."""
    entropy = vocab_parallel_entropy(logits, temperature) if with_entropy else None
    logp = vocab_parallel_logprobs(logits, batch["labels"], temperature)
    if "cu_seqlens" not in batch:
        return batch, logp, entropy
    unpacked_entropy = unpack_tokens(entropy, batch) if entropy is not None else None
    return batch["padded"], unpack_tokens(logp, batch), unpacked_entropy


def _logprob_only_loss(key: str, temperature: float, batch: dict[str, Any],
                       logits: torch.Tensor):
    view, logp, _ = _token_view(batch, logits, temperature, with_entropy=False)
    view[key] = logp.detach()
    zero = logits.sum() * 0.0
    return zero, torch.tensor(1, dtype=torch.int), {}


def _grpo_loss(loss_kwargs: dict[str, Any], temperature: float, on_policy: bool,
               batch: dict[str, Any], logits: torch.Tensor):
    view, logp, entropy = _token_view(batch, logits, temperature, with_entropy=True)
    view.setdefault("train_logp", logp.detach())  # rollout parity (first epoch's weights)
    mask = view["loss_mask"]
    old_logp = logp.detach() if on_policy else view["old_logp"]
    terms = policy_loss_terms(
        logp, old_logp, view["advantages"], mask, ref_logp=view.get("ref_logp"),
        rollout_logp=view.get("rollout_logp"), **loss_kwargs)
    stats = dict(terms.stat_sums)
    valid = mask > 0
    stats["entropy"] = entropy[valid].sum().to(stats["tokens"].dtype)
    stats["numerator"] = terms.numerator.detach()
    stats["denominator"] = terms.denominator.detach().to(stats["tokens"].dtype)
    return terms.numerator, terms.denominator.to(torch.int), stats


def _microbatches(batch: RolloutBatch, advantages: torch.Tensor, micro_batch_size: int,
                  dp_rank: int, dp_size: int) -> list[dict[str, torch.Tensor]]:
    tokens = batch.tokens
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    b, s = inputs.shape
    full = {
        "tokens": inputs, "labels": labels,
        "loss_mask": batch.response_mask.to(torch.float32),
        "position_ids": torch.arange(s).unsqueeze(0).expand(b, -1).contiguous(),
        "advantages": advantages.to(torch.float32),
    }
    if batch.rollout_logprobs is not None:
        full["rollout_logp"] = batch.rollout_logprobs.to(torch.float32)
    if batch.routing is not None:
        full["routing"] = batch.routing
    return data_parallel_microbatches(full, micro_batch_size, dp_rank, dp_size)


_STEP_STATS = (*STAT_KEYS, "tokens", "entropy", "numerator", "denominator")


def _pack_all(mbs: list[dict[str, torch.Tensor]], sequence_parallel_tp: int
              ) -> list[dict[str, Any]]:
    """Padding-free microbatches of one shape job-wide (pipeline P2P buffers have one
    shape, and MoE token dispatch is collective across ranks); each keeps its padded
    original under ``"padded"`` for the loss."""
    lengths = [valid_lengths(mb["loss_mask"]) for mb in mbs]
    longest = torch.tensor([max(int(n.sum()) for n in lengths)])
    dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    multiple = max(sequence_parallel_tp, 1)
    total = -(-max(int(longest), 1) // multiple) * multiple
    packed_mbs = []
    for mb, n in zip(mbs, lengths, strict=True):
        core = {k: mb[k] for k in ("tokens", "labels", "loss_mask", "position_ids", "routing")
                if k in mb}
        core["lengths"] = n
        packed = pack_microbatch(core, pad_to_multiple=multiple, total_length=total)
        packed["padded"] = mb
        packed_mbs.append(packed)
    return packed_mbs


def _kl_reward_penalties(mbs: list[dict[str, Any]], grpo_cfg: Any, batch_size: int,
                         dp_rank: int, dp_size: int, micro_batch_size: int) -> torch.Tensor:
    """Per-sample ``kl_coef * sum_t KL`` (``grpo.kl_in_reward``) for the global batch, on
    every rank: computed where the log-probs live (last stage), summed over DP."""
    from megatron.core import parallel_state as ps

    penalty = torch.zeros(batch_size, dtype=torch.float64)
    if ps.is_pipeline_last_stage():
        per_rank = batch_size // dp_size
        for i, mb in enumerate(mbs):
            view = mb.get("padded", mb)
            start = dp_rank * per_rank + i * micro_batch_size
            penalty[start:start + micro_batch_size] = kl_reward_penalty(
                view["old_logp"], view["ref_logp"], view["loss_mask"], grpo_cfg.kl_coef,
                grpo_cfg.kl_estimator).double()
        dist.all_reduce(penalty, group=ps.get_data_parallel_group())
    pp_group = ps.get_pipeline_model_parallel_group()
    src = dist.get_global_rank(pp_group, ps.get_pipeline_model_parallel_world_size() - 1)
    dist.broadcast(penalty, src=src, group=pp_group)
    return penalty


def _sum_stats(stats: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Sum per-microbatch statistics over microbatches and DP ranks; the result is
    broadcast from the last pipeline stage (the only one computing the loss) to all."""
    from megatron.core import parallel_state as ps

    totals = torch.zeros(len(_STEP_STATS), dtype=torch.float64)
    if ps.is_pipeline_last_stage():
        for s in stats:
            totals += torch.stack([s[k].double() for k in _STEP_STATS])
        dist.all_reduce(totals, group=ps.get_data_parallel_group())
    pp_group = ps.get_pipeline_model_parallel_group()
    src = dist.get_global_rank(pp_group, ps.get_pipeline_model_parallel_world_size() - 1)
    dist.broadcast(totals, src=src, group=pp_group)
    return dict(zip(_STEP_STATS, totals, strict=True))


def grpo_step(policy: Policy, reference: ReferencePolicy | None, optimizer: Any,
              scheduler: Any, batch: RolloutBatch, grpo_cfg: Any, train_cfg: Any,
              dp_size: int, temperature: float = 1.0,
              max_response_len: int | None = None, pack: bool = False,
              logprob_outlier_threshold: float = 0.1) -> dict[str, float]:
    """Run one GRPO update on this rank; returns global metrics (same on every rank)."""
    from megatron.core import parallel_state as ps

    from r1mega.rollout.parity import logprob_parity

    policy_forward = with_routing_replay(packed_rl_forward)

    rewards = batch.rewards.to(torch.float64)
    dp_rank = ps.get_data_parallel_rank()
    need_ref = reference is not None and (grpo_cfg.kl_coef > 0)
    advantages = compute_advantages(rewards, grpo_cfg)
    mbs = _microbatches(batch, advantages, train_cfg.micro_batch_size, dp_rank, dp_size)
    if grpo_cfg.drop_uniform_groups:
        keep = ~uniform_groups(rewards, grpo_cfg.group_size)
        keep_rows = keep.repeat_interleave(grpo_cfg.group_size)
        per_rank = len(rewards) // dp_size
        rows = keep_rows[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        for i, mb in enumerate(mbs):
            sl = rows[i * train_cfg.micro_batch_size:(i + 1) * train_cfg.micro_batch_size]
            mb["loss_mask"] = mb["loss_mask"] * sl.unsqueeze(1).to(torch.float32)

    if pack:
        sp_tp = ps.get_tensor_model_parallel_world_size() if policy.config.sequence_parallel \
            else 1
        mbs = _pack_all(mbs, sp_tp)
    if need_ref:
        with reference.swapped_into(policy):
            forward_backward(policy, mbs, partial(_logprob_only_loss, "ref_logp", temperature),
                             forward_only=True, model_forward=packed_rl_forward)
    kl_in_reward = need_ref and grpo_cfg.kl_in_reward
    on_policy = grpo_cfg.epochs_per_step == 1 and not kl_in_reward
    if not on_policy:
        forward_backward(policy, mbs, partial(_logprob_only_loss, "old_logp", temperature),
                         forward_only=True, model_forward=policy_forward)
    kl_penalty = None
    if kl_in_reward:
        kl_penalty = _kl_reward_penalties(mbs, grpo_cfg, len(rewards), dp_rank, dp_size,
                                          train_cfg.micro_batch_size)
        rewards = rewards - kl_penalty
        advantages = compute_advantages(rewards, grpo_cfg)
        per_rank = len(rewards) // dp_size
        for i, mb in enumerate(mbs):
            start = dp_rank * per_rank + i * train_cfg.micro_batch_size
            view = mb.get("padded", mb)
            view["advantages"] = advantages[start:start + train_cfg.micro_batch_size].float()
    loss_kwargs = loss_kwargs_from_config(grpo_cfg, max_response_len)
    if not need_ref:
        loss_kwargs["kl_coef"] = 0.0
    metrics: dict[str, float] = {}
    for _ in range(grpo_cfg.epochs_per_step):
        policy.zero_grad()
        optimizer.zero_grad()
        stats = forward_backward(policy, mbs, partial(_grpo_loss, loss_kwargs, temperature,
                                                      on_policy),
                                 model_forward=policy_forward)
        lr = optimizer.param_groups[0]["lr"]
        _, grad_norm, _ = optimizer.step()
        scheduler.step(increment=1)
        sums = _sum_stats(stats)
        metrics = {k: float(v) for k, v in finalize_stats(
            {k: v for k, v in sums.items() if k not in ("numerator", "denominator")}).items()}
        metrics["loss"] = float(sums["numerator"] / sums["denominator"].clamp_min(1))
        metrics["grad_norm"] = float(grad_norm or 0.0)
        metrics["lr"] = lr
    if kl_penalty is not None:
        metrics["kl_penalty_mean"] = float(kl_penalty.mean())
    if batch.rollout_logprobs is not None:
        metrics.update(logprob_parity(mbs, logprob_outlier_threshold))
    metrics["reward_mean"] = float(batch.rewards.to(torch.float64).mean())
    metrics["advantage_abs_mean"] = float(advantages.abs().mean())
    metrics["uniform_group_frac"] = float(
        uniform_groups(rewards, grpo_cfg.group_size).float().mean())
    return metrics
