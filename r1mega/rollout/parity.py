"""Rollout-vs-trainer log-probability parity, measured every step.

The rollout engine returns the log-probability of every token it sampled; the trainer
recomputes the same quantity in its first forward pass of the step (same weights, same
temperature). The two differ by rounding only when everything is right; a refit that
missed a tensor, stale KV, a routing flip or a precision mismatch shows up here first.
Peer frameworks' users report gaps large enough to destabilise runs (outlier sequences,
MoE routing that disagrees in most layers), so the gap is a step metric:

* ``rollout/logprob_diff_mean`` and ``rollout/logprob_diff_max``: ``|rollout - train|``
  over the step's response tokens;
* ``rollout/logprob_diff_outlier_frac``: the fraction of tokens whose gap exceeds
  ``rollout.logprob_outlier_threshold``.

With ``rollout.logprob_check`` set, :func:`check_logprob_parity` stops the run when the
mean gap exceeds it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

METRIC_PREFIX = "rollout/logprob_diff"


class LogprobParityError(RuntimeError):
    """The rollout's log-probabilities disagree with the trainer's beyond the bound."""


def logprob_parity(microbatches: list[dict[str, Any]], threshold: float) -> dict[str, float]:
    """Parity metrics from microbatches whose (padded) views hold ``train_logp``,
    ``rollout_logp`` and ``loss_mask`` ``[b, s]`` (the trainer's own log-probabilities are
    on the last pipeline stage). Collective over the job; the same values on every rank."""
    from megatron.core import parallel_state as ps

    sums = torch.zeros(3, dtype=torch.float64)  # |diff| sum, tokens, tokens over threshold
    worst = torch.zeros(1, dtype=torch.float64)
    if ps.is_pipeline_last_stage():
        for mb in microbatches:
            view = mb.get("padded", mb)
            if "train_logp" not in view or "rollout_logp" not in view:
                continue
            valid = view["loss_mask"] > 0
            gap = (view["train_logp"].double() - view["rollout_logp"].double()).abs()[valid]
            if gap.numel():
                sums += torch.stack([gap.sum(), torch.tensor(float(gap.numel()),
                                                             dtype=torch.float64),
                                     (gap > threshold).sum().double()]).cpu()
                worst = torch.maximum(worst, gap.max().cpu()[None])
        # Under context parallelism each rank holds part of every sequence's tokens.
        dp = ps.get_data_parallel_group(with_context_parallel=True)
        dist.all_reduce(sums, group=dp)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=dp)
    pp_group = ps.get_pipeline_model_parallel_group()
    last = dist.get_global_rank(pp_group, ps.get_pipeline_model_parallel_world_size() - 1)
    both = torch.cat([sums, worst])
    dist.broadcast(both, src=last, group=pp_group)
    total, count, over, top = both.tolist()
    if count == 0:
        return {}
    return {f"{METRIC_PREFIX}_mean": total / count, f"{METRIC_PREFIX}_max": top,
            f"{METRIC_PREFIX}_outlier_frac": over / count}


def check_logprob_parity(metrics: dict[str, float], bound: float | None) -> None:
    """Stop the run (every rank raises) when the step's mean gap exceeds ``bound``."""
    mean = metrics.get(f"{METRIC_PREFIX}_mean")
    if bound is None or mean is None or mean <= bound:
        return
    raise LogprobParityError(
        f"rollout.logprob_check: the rollout engine's log-probabilities differ from the "
        f"trainer's by {mean:.3g} per token on average (max "
        f"{metrics[f'{METRIC_PREFIX}_max']:.3g}, bound {bound:g}). The generation model "
        "does not compute what the policy computes: check the refit (resharding) and the "
        "generation precision, and enable rollout.routing_replay for MoE models.")
