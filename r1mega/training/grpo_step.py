"""One GRPO step on megatron-core: log-probs, reference log-probs, loss, optimizer updates.

Input is one rollout (prompt + response token ids, a response mask, rewards and
optionally the generation engine's log-probabilities), identical on every rank. The same
code runs at any TP/PP/EP/CP/DP layout, every pass through megatron-core's pipeline
schedules:

1. advantages from the rewards (group-normalised; identical on every rank); with
   ``grpo.drop_uniform_groups`` the groups without reward spread lose their loss tokens;
2. the rollout's prompt groups are split into ``grpo.minibatches`` minibatches of whole
   groups (DeepSeek-R1: 8,192 outputs in 16 minibatches), each one optimizer update; a
   minibatch is split over DP ranks (contiguous rows; a group may straddle two ranks,
   its advantages being computed on the whole rollout first), then into microbatches of
   ``train.micro_batch_size`` rows, and with CP every row's tokens over the CP ranks
   (:mod:`r1mega.training.context_parallel`);
3. reference log-probabilities: the host-held reference weights are swapped into the
   policy for a forward-only pass (:mod:`r1mega.training.reference`);
4. old log-probabilities, from before the first update: with a single update per step
   they equal the current ones in value, so no extra pass runs; otherwise (several
   minibatches or epochs, or the KL subtracted from the rewards) a forward-only pass
   records them for the whole rollout first;
5. for each of ``grpo.epochs_per_step`` epochs, for each minibatch: forward/backward with
   the clipped GRPO loss (sum form, divided by the global count by megatron-core),
   gradient finalisation, then one optimizer update (LR schedule advanced first,
   :func:`r1mega.training.optim.optimizer_update`). A minibatch without a single loss
   token (every group dropped as uniform, or empty responses) takes no update: Adam on
   zero gradients would still move the weights through its moments; it is counted in
   ``skipped_updates`` and spends its slot of the LR schedule.

Forward-only passes run without autograd, so they keep no activations and do not count
tokens into the MoE router's expert-bias statistics (which must reflect the batches the
updates train on). Log-probabilities and entropy come from vocab-parallel logits without
gathering the vocabulary (:mod:`r1mega.training.logprobs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from r1mega.algorithms import compute_advantages, kl_reward_penalty, policy_loss_terms
from r1mega.algorithms.advantages import uniform_groups
from r1mega.algorithms.policy_loss import STAT_KEYS, finalize_stats, loss_kwargs_from_config
from r1mega.training.batches import data_parallel_microbatches
from r1mega.training.context_parallel import (
    cp_seq_reduce,
    cp_size_and_rank,
    gather_token_values,
    split_microbatch,
)
from r1mega.training.logprobs import vocab_parallel_entropy, vocab_parallel_logprobs
from r1mega.training.optim import optimizer_update, skip_update
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


@dataclass
class StepResult:
    """A GRPO step's metrics (the same on every rank) and one record per update."""

    metrics: dict[str, float]
    # Per optimizer update, in order: loss (before the update), lr, grad_norm, skipped.
    updates: list[dict[str, float]] = field(default_factory=list)


#: Per-token entries of an RL microbatch (split over CP ranks, packed, unpacked).
_PER_TOKEN = ("tokens", "labels", "loss_mask", "position_ids", "rollout_logp")


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
    mask = view["loss_mask"]
    old_logp = logp.detach() if on_policy else view["old_logp"]
    # Rollout parity: the trainer's log-probs under the rollout's weights (from before
    # the first update, like old_logp).
    view.setdefault("train_logp", old_logp.detach())
    seq_reduce = cp_seq_reduce()
    terms = policy_loss_terms(
        logp, old_logp, view["advantages"], mask, ref_logp=view.get("ref_logp"),
        rollout_logp=view.get("rollout_logp"), seq_reduce=seq_reduce, **loss_kwargs)
    denominator = terms.denominator
    if seq_reduce is not None and loss_kwargs["loss_agg"] != "token-mean" \
            and cp_size_and_rank()[1] != 0:
        # Sequence counts are already whole-sequence on every CP rank; megatron sums the
        # denominator over DP x CP, so only CP rank 0 reports it.
        denominator = torch.zeros_like(denominator)
    stats = dict(terms.stat_sums)
    valid = mask > 0
    stats["entropy"] = entropy[valid].sum().to(stats["tokens"].dtype)
    stats["numerator"] = terms.numerator.detach()
    stats["denominator"] = denominator.detach().to(stats["tokens"].dtype)
    return terms.numerator, denominator.to(torch.int), stats


def _minibatches(batch: RolloutBatch, advantages: torch.Tensor, keep_rows: torch.Tensor,
                 minibatches: int, micro_batch_size: int, dp_rank: int, dp_size: int
                 ) -> list[list[dict[str, torch.Tensor]]]:
    """This rank's microbatches of every minibatch (see the module docstring, step 2).

    Each microbatch carries its global row indices (``rows``) so per-row values computed
    later on the whole rollout (advantages after a KL penalty) can be placed."""
    tokens = batch.tokens
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    b, s = inputs.shape
    full = {
        "tokens": inputs, "labels": labels,
        "loss_mask": batch.response_mask.to(torch.float32)
        * keep_rows.unsqueeze(1).to(torch.float32),
        "position_ids": torch.arange(s).unsqueeze(0).expand(b, -1).contiguous(),
        "advantages": advantages.to(torch.float32),
        "rows": torch.arange(b),
    }
    if batch.rollout_logprobs is not None:
        full["rollout_logp"] = batch.rollout_logprobs.to(torch.float32)
    if batch.routing is not None:
        # Sliced by rows like every other entry: each minibatch replays its own rows'
        # routing. Not split over CP (routing replay refuses CP, see routing_replay).
        full["routing"] = batch.routing
    if b % minibatches:
        raise ValueError(f"{b} rollouts do not split into grpo.minibatches={minibatches}")
    rows = b // minibatches
    out = []
    for m in range(minibatches):
        mini = {k: v[m * rows:(m + 1) * rows] for k, v in full.items()}
        mbs = data_parallel_microbatches(mini, micro_batch_size, dp_rank, dp_size)
        out.append([split_microbatch(mb, tuple(k for k in _PER_TOKEN if k in mb))
                    for mb in mbs])
    return out


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


def _last_stage_source() -> tuple[Any, int]:
    from megatron.core import parallel_state as ps

    pp_group = ps.get_pipeline_model_parallel_group()
    return pp_group, dist.get_global_rank(pp_group,
                                          ps.get_pipeline_model_parallel_world_size() - 1)


def _kl_reward_penalties(mbs: list[dict[str, Any]], grpo_cfg: Any, batch_size: int,
                         device: torch.device) -> torch.Tensor:
    """Per-sample ``kl_coef * sum_t KL`` (``grpo.kl_in_reward``) for the whole rollout, on
    every rank: computed where the log-probs live (last stage; partial sums of each
    row's tokens under CP), summed over DP x CP."""
    from megatron.core import parallel_state as ps

    penalty = torch.zeros(batch_size, dtype=torch.float64, device=device)
    if ps.is_pipeline_last_stage():
        for mb in mbs:
            view = mb.get("padded", mb)
            penalty[view["rows"].to(device)] = kl_reward_penalty(
                view["old_logp"], view["ref_logp"], view["loss_mask"], grpo_cfg.kl_coef,
                grpo_cfg.kl_estimator).to(device, torch.float64)
        dist.all_reduce(penalty, group=ps.get_data_parallel_group(with_context_parallel=True))
    pp_group, src = _last_stage_source()
    dist.broadcast(penalty, src=src, group=pp_group)
    return penalty.cpu()


def _sum_stats(stats: list[dict[str, torch.Tensor]], device: torch.device) -> torch.Tensor:
    """Per-microbatch statistics summed over microbatches and DP x CP ranks, as a
    ``[len(_STEP_STATS)]`` tensor broadcast from the last pipeline stage (the only one
    computing the loss) to all."""
    from megatron.core import parallel_state as ps

    totals = torch.zeros(len(_STEP_STATS), dtype=torch.float64, device=device)
    if ps.is_pipeline_last_stage():
        for s in stats:
            totals += torch.stack([s[k].to(device, torch.float64) for k in _STEP_STATS])
        dist.all_reduce(totals, group=ps.get_data_parallel_group(with_context_parallel=True))
    pp_group, src = _last_stage_source()
    dist.broadcast(totals, src=src, group=pp_group)
    return totals.cpu()


#: The policy's forward: packed or padded, replaying the rollout's MoE routing when the
#: microbatch carries it (``rollout.routing_replay``).
_POLICY_FORWARD = with_routing_replay(packed_rl_forward)


def _forward_only(policy: Policy, mbs: list[dict[str, Any]], key: str,
                  temperature: float) -> None:
    """Store the policy's log-probabilities of every microbatch under ``key``."""
    forward_backward(policy, mbs, partial(_logprob_only_loss, key, temperature),
                     forward_only=True, model_forward=_POLICY_FORWARD)


def grpo_step(policy: Policy, reference: ReferencePolicy | None, optimizer: Any,
              scheduler: Any, batch: RolloutBatch, grpo_cfg: Any, train_cfg: Any,
              dp_size: int, temperature: float = 1.0,
              max_response_len: int | None = None, pack: bool = False,
              logprob_outlier_threshold: float = 0.1) -> StepResult:
    """Run one GRPO step (``grpo.minibatches * grpo.epochs_per_step`` optimizer updates)
    on this rank; returns the step's metrics (the same on every rank).

    Metrics are over the whole step: token means of the loss statistics over every
    update's tokens, ``loss`` and ``grad_norm`` averaged over the updates taken, ``lr`` of
    the last update, ``updates`` and ``skipped_updates`` counted; with the rollout's
    log-probabilities, their gap to the trainer's before the first update
    (:mod:`r1mega.rollout.parity`, ``rollout/logprob_diff_*``, counted with
    ``logprob_outlier_threshold``).
    """
    from megatron.core import parallel_state as ps

    from r1mega.rollout.parity import logprob_parity

    rewards = batch.rewards.to(torch.float64)
    dp_rank = ps.get_data_parallel_rank()
    device = next(policy.chunks[0].parameters()).device
    need_ref = reference is not None and (grpo_cfg.kl_coef > 0)
    if pack and cp_size_and_rank()[0] > 1:
        raise ValueError("packed rollouts are not split over context parallelism: set "
                         "train.pack_sequences=false or train_layout.cp=1")
    advantages = compute_advantages(rewards, grpo_cfg)
    keep_rows = torch.ones(len(rewards), dtype=torch.bool)
    if grpo_cfg.drop_uniform_groups:
        keep_rows = (~uniform_groups(rewards, grpo_cfg.group_size)).repeat_interleave(
            grpo_cfg.group_size)
    minibatches = _minibatches(batch, advantages, keep_rows, grpo_cfg.minibatches,
                               train_cfg.micro_batch_size, dp_rank, dp_size)
    # Minibatches with no loss token at all (known on every rank: the rollout is).
    trainable = ((batch.response_mask.sum(dim=1) > 0) & keep_rows).view(
        grpo_cfg.minibatches, -1).any(dim=1).tolist()
    if pack:
        sp_tp = ps.get_tensor_model_parallel_world_size() if policy.config.sequence_parallel \
            else 1
        minibatches = [_pack_all(mbs, sp_tp) for mbs in minibatches]
    if need_ref:
        with reference.swapped_into(policy):
            for mbs in minibatches:
                _forward_only(policy, mbs, "ref_logp", temperature)
    kl_in_reward = need_ref and grpo_cfg.kl_in_reward
    on_policy = grpo_cfg.minibatches * grpo_cfg.epochs_per_step == 1 and not kl_in_reward
    if not on_policy:
        for mbs in minibatches:
            _forward_only(policy, mbs, "old_logp", temperature)
    kl_penalty = None
    if kl_in_reward:
        kl_penalty = _kl_reward_penalties([mb for mbs in minibatches for mb in mbs], grpo_cfg,
                                          len(rewards), device)
        rewards = rewards - kl_penalty
        advantages = compute_advantages(rewards, grpo_cfg)
        for mbs in minibatches:
            for mb in mbs:
                view = mb.get("padded", mb)
                view["advantages"] = advantages[view["rows"].cpu()].to(
                    view["loss_mask"].device, torch.float32)
    loss_kwargs = loss_kwargs_from_config(grpo_cfg, max_response_len)
    if not need_ref:
        loss_kwargs["kl_coef"] = 0.0
    loss_fn = partial(_grpo_loss, loss_kwargs, temperature, on_policy)
    totals = torch.zeros(len(_STEP_STATS), dtype=torch.float64)
    updates: list[dict[str, float]] = []
    for _ in range(grpo_cfg.epochs_per_step):
        for mbs, has_tokens in zip(minibatches, trainable, strict=True):
            if not has_tokens:
                updates.append({"loss": 0.0, "lr": skip_update(scheduler), "grad_norm": 0.0,
                                "skipped": 1.0})
                continue
            policy.zero_grad()
            optimizer.zero_grad()
            stats = forward_backward(policy, mbs, loss_fn, model_forward=_POLICY_FORWARD)
            lr, grad_norm = optimizer_update(optimizer, scheduler)
            sums = dict(zip(_STEP_STATS, _sum_stats(stats, device), strict=True))
            totals += torch.stack([sums[k] for k in _STEP_STATS])
            updates.append({"loss": float(sums["numerator"] / sums["denominator"].clamp_min(1)),
                            "lr": lr, "grad_norm": grad_norm, "skipped": 0.0})
    sums = dict(zip(_STEP_STATS, totals, strict=True))
    metrics = {k: float(v) for k, v in finalize_stats(
        {k: v for k, v in sums.items() if k not in ("numerator", "denominator")}).items()}
    taken = [u for u in updates if not u["skipped"]]
    metrics["loss"] = sum(u["loss"] for u in taken) / max(len(taken), 1)
    metrics["grad_norm"] = sum(u["grad_norm"] for u in taken) / max(len(taken), 1)
    metrics["lr"] = updates[-1]["lr"]
    metrics["updates"] = float(len(taken))
    metrics["skipped_updates"] = float(len(updates) - len(taken))
    if kl_penalty is not None:
        metrics["kl_penalty_mean"] = float(kl_penalty.mean())
    if batch.rollout_logprobs is not None:
        metrics.update(logprob_parity([mb for mbs in minibatches for mb in mbs],
                                      logprob_outlier_threshold))
    metrics["reward_mean"] = float(batch.rewards.to(torch.float64).mean())
    metrics["advantage_abs_mean"] = float(advantages.abs().mean())
    metrics["uniform_group_frac"] = float(
        uniform_groups(batch.rewards.to(torch.float64), grpo_cfg.group_size).float().mean())
    return StepResult(metrics=metrics, updates=updates)


def policy_logprobs(policy: Policy, batch: RolloutBatch, micro_batch_size: int, dp_size: int,
                    temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probabilities ``[B, S]`` of the rollout's labels under the policy as
    it is, on every rank: the forward-only pass the step records old log-probabilities
    with (for diagnostics and for checking the step against an independent reference)."""
    from megatron.core import parallel_state as ps

    b, s = batch.response_mask.shape
    device = next(policy.chunks[0].parameters()).device
    (mbs,) = _minibatches(batch, torch.zeros(b), torch.ones(b, dtype=torch.bool), 1,
                          micro_batch_size, ps.get_data_parallel_rank(), dp_size)
    _forward_only(policy, mbs, "logp", temperature)
    out = torch.zeros(b, s, dtype=torch.float32, device=device)
    if ps.is_pipeline_last_stage():
        for mb in mbs:
            out[mb["rows"].to(device)] = gather_token_values(mb["logp"].float(), s)
        dist.all_reduce(out, group=ps.get_data_parallel_group())
    pp_group, src = _last_stage_source()
    dist.broadcast(out, src=src, group=pp_group)
    return out.cpu()
