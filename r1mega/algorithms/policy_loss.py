"""The GRPO policy loss on per-token log-probabilities, with its published variants.

All ``[B, S]`` inputs are aligned per token (``logp[b, t]`` is the log-probability of
token ``t`` of sequence ``b``); ``mask`` is 1 on response tokens and 0 on prompt and
padding (any value > 0 counts as 1, so it is a selector, not a weight). Values at masked
positions are never used, even if they are ``inf``/``nan``. ``advantages`` is ``[B]`` (one
per sequence, broadcast to its tokens) or ``[B, S]``. The arithmetic follows the dtype of
``logp``: pass float32 (or float64) log-probabilities, not bfloat16.

Variants
--------
* PPO clipped surrogate (Schulman et al. 2017, "Proximal Policy Optimization
  Algorithms"), as used by GRPO (Shao et al. 2024, DeepSeekMath): with
  ``ratio = exp(logp - old_logp)``, per token
  ``max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high))``.
  ``clip_high > clip_low`` is DAPO's clip-higher (Yu et al. 2025, "DAPO", sec. 3.1).
* Dual clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep
  Reinforcement Learning", as in verl): for ``A < 0`` the loss is further bounded by
  ``-A * dual_clip`` (``dual_clip > 1``), so a huge ratio on a bad token cannot blow up.
* GSPO sequence-level ratio (Zheng et al. 2025, "Group Sequence Policy Optimization"):
  ``s_i = exp(mean_t (logp - old_logp))`` over sequence ``i``'s response tokens, in the
  paper's GSPO-token form ``s_i,t = sg(s_i) * exp(logp_t - sg(logp_t))``: every token
  carries the value ``s_i`` and the gradient ``s_i * grad logp_t``, and the clip
  (``clip_low``/``clip_high``, GSPO uses e.g. 3e-4/4e-4) acts on ``s_i``. Combined with
  ``seq-mean-token-mean`` this is exactly GSPO's objective and gradient.
* Truncated importance sampling (Yao et al. 2025, "Your Efficient RL Framework Secretly
  Brings You Off-Policy RL Training"): when the rollout engine's log-probabilities
  ``rollout_logp`` differ from the trainer's ``old_logp``, each token's policy loss is
  multiplied by the detached ``w = min(exp(old_logp - rollout_logp), tis_cap)``. The
  KL term is not reweighted.
* KL to the reference as a loss term (DeepSeekMath eq. 3): ``+ kl_coef * kl_penalty``
  per token (:mod:`r1mega.algorithms.kl`), aggregated like the policy loss. For
  ``kl_in_reward`` use :func:`r1mega.algorithms.kl.kl_reward_penalty` instead.

Aggregation (``loss_agg``)
--------------------------
* ``token-mean``: ``sum_{b,t} l * m / sum_{b,t} m`` (DAPO, sec. 3.3: every token weighs
  the same, long answers are not down-weighted).
* ``seq-mean-token-mean``: mean over sequences of each sequence's token mean (the
  original GRPO objective, DeepSeekMath eq. 3).
* ``seq-mean-token-sum-norm``: each sequence's token *sum* divided by the constant
  ``max_response_len`` (the generation budget), then the mean over sequences (Dr. GRPO,
  Liu et al. 2025, which removes GRPO's length bias).

Sequences with no response token (padding rows, groups dropped by zeroing their mask)
are left out of the sequence means.

The microbatch "sum form" contract
----------------------------------
The trainer splits a batch into microbatches along the batch dimension and uses
megatron-core's ``calculate_per_token_loss``: the loss function returns a *sum* and a
count, the backward pass runs on the sum, and the gradients are divided by the count
summed over all microbatches and data-parallel ranks. :func:`policy_loss_terms` returns
``(numerator, denominator)`` for one microbatch such that::

    sum(numerator over microbatches) / sum(denominator over microbatches)
        == policy_loss(whole batch)

exactly (up to float summation order), for every mode:

* ``token-mean``: numerator = ``sum l * m``, denominator = number of response tokens.
* ``seq-mean-token-mean``: numerator = ``sum_i (sum_t l_i,t m_i,t) / n_i``,
  denominator = number of (non-empty) sequences.
* ``seq-mean-token-sum-norm``: numerator = ``sum_i (sum_t l_i,t m_i,t) /
  max_response_len``, denominator = number of (non-empty) sequences.

The denominator is a 0-dim ``torch.int`` tensor, like megatron's own token counts, so
it can be returned as ``num_tokens`` from a megatron loss function. The statistics are
returned the same way, as token sums plus a ``"tokens"`` count
(:func:`finalize_stats` turns summed ones into means).

Context parallelism: a sequence is then split over CP ranks. Pass ``seq_reduce`` (a sum
of a ``[B]`` tensor over the CP group) so that per-sequence token counts and GSPO's
mean log-ratio see the whole sequence (they are detached, so a plain all-reduce is
enough). For the sequence modes the caller must then count each sequence once, e.g.
report the denominator on CP rank 0 only, since megatron sums it over DP x CP.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from r1mega.algorithms.kl import KL_ESTIMATORS, LOG_RATIO_CLAMP, KLEstimator, kl_penalty

LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
RatioLevel = Literal["token", "sequence"]
LOSS_AGGS: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
RATIO_LEVELS: tuple[str, ...] = ("token", "sequence")
SeqReduce = Callable[[Tensor], Tensor]

#: Keys of the statistics, each a token mean over response tokens after finalize_stats.
STAT_KEYS: tuple[str, ...] = (
    "clip_frac",        # clipping active (either side)
    "clip_frac_low",    # ratio < 1 - clip_low with A < 0
    "clip_frac_high",   # ratio > 1 + clip_high with A > 0
    "dual_clip_frac",   # dual clip active (A < 0, -A * dual_clip below the clipped loss)
    "ratio_mean",       # importance ratio (s_i for GSPO)
    "ppo_kl",           # mean(old_logp - logp): k1 estimate of KL(old || new)
    "ppo_kl_k3",        # k3 estimate of KL(old || new)
    "kl_ref",           # kl_penalty(logp, ref_logp) with the chosen estimator; 0 w/o ref
    "tis_weight_mean",  # truncated IS weight; 1 when TIS is off
    "tis_clip_frac",    # tokens whose IS weight hit tis_cap
)


class PolicyLossTerms(NamedTuple):
    """One microbatch's share of the loss (see the module docstring's contract)."""

    numerator: Tensor  # 0-dim, differentiable
    denominator: Tensor  # 0-dim torch.int: tokens (token-mean) or sequences
    stat_sums: dict[str, Tensor]  # detached token sums of STAT_KEYS, plus "tokens"


def _check_loss_agg(loss_agg: str, max_response_len: int | None) -> None:
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"unknown loss_agg {loss_agg!r}; expected one of {LOSS_AGGS}")
    if loss_agg == "seq-mean-token-sum-norm" and (max_response_len is None
                                                  or max_response_len <= 0):
        raise ValueError("loss_agg='seq-mean-token-sum-norm' (Dr. GRPO) divides every "
                         "sequence's token sum by a constant: pass max_response_len (the "
                         f"generation budget, rollout.max_new_tokens), got {max_response_len}")


def aggregate_terms(values: Tensor, mask: Tensor, loss_agg: LossAgg | str = "token-mean",
                    max_response_len: int | None = None,
                    seq_reduce: SeqReduce | None = None) -> tuple[Tensor, Tensor]:
    """``(numerator, denominator)`` of per-token ``values [B, S]`` under ``loss_agg``.

    The module docstring gives the formulas; summing both over microbatches and dividing
    gives the aggregate over the whole batch.
    """
    _check_loss_agg(loss_agg, max_response_len)
    valid = mask > 0
    masked = torch.where(valid, values, torch.zeros_like(values))
    if loss_agg == "token-mean":
        return masked.sum(), valid.sum().to(torch.int)
    # Counts in >= float32: bfloat16 cannot even hold a length of 257 exactly.
    seq_tokens = valid.sum(dim=-1).to(torch.promote_types(values.dtype, torch.float32))
    if seq_reduce is not None:
        seq_tokens = seq_reduce(seq_tokens)
    seq_sums = masked.sum(dim=-1)
    if loss_agg == "seq-mean-token-mean":
        numerator = (seq_sums / seq_tokens.clamp_min(1)).sum()
    else:
        assert max_response_len is not None
        numerator = seq_sums.sum() / max_response_len
    return numerator, (seq_tokens > 0).sum().to(torch.int)


def aggregate(values: Tensor, mask: Tensor, loss_agg: LossAgg | str = "token-mean",
              max_response_len: int | None = None,
              seq_reduce: SeqReduce | None = None) -> Tensor:
    """Aggregate per-token ``values [B, S]`` to a scalar under ``loss_agg`` (0 if empty)."""
    numerator, denominator = aggregate_terms(values, mask, loss_agg, max_response_len,
                                             seq_reduce)
    return numerator / denominator.clamp_min(1).to(numerator.dtype)


def policy_loss_terms(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None = None,
    ratio_level: RatioLevel | str = "token",
    loss_agg: LossAgg | str = "token-mean",
    ref_logp: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator | str = "k3",
    rollout_logp: Tensor | None = None,
    tis_cap: float | None = None,
    max_response_len: int | None = None,
    seq_reduce: SeqReduce | None = None,
) -> PolicyLossTerms:
    """One microbatch's ``(numerator, denominator, stat_sums)`` of the GRPO loss.

    Args:
        logp: ``[B, S]`` current policy log-probabilities of the sampled tokens
            (differentiable; the only input gradients flow to).
        old_logp: ``[B, S]`` log-probabilities under the policy that generated the batch,
            recomputed by the trainer (equal to ``logp`` in value on the first epoch).
        advantages: ``[B]`` per-sequence (or ``[B, S]`` per-token) advantages.
        mask: ``[B, S]`` 1 on response tokens.
        clip_low, clip_high: the ratio is clipped to ``[1 - clip_low, 1 + clip_high]``;
            ``clip_low >= 1`` makes the lower bound <= 0, which a ratio never reaches, so
            only the upper clip binds (DeepSeek-R1 trains with a clip ratio of 10).
        dual_clip: dual-clip constant ``c > 1`` (Ye et al. 2020), or None.
        ratio_level: ``"token"`` (PPO/GRPO) or ``"sequence"`` (GSPO).
        loss_agg: ``"token-mean"``, ``"seq-mean-token-mean"`` or
            ``"seq-mean-token-sum-norm"`` (needs ``max_response_len``).
        ref_logp: ``[B, S]`` reference-model log-probabilities, for the KL term and stat.
        kl_coef: weight of the KL-to-reference loss term (needs ``ref_logp`` if > 0).
        kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"``.
        rollout_logp: ``[B, S]`` log-probabilities reported by the generation engine.
        tis_cap: truncated importance sampling cap (needs ``rollout_logp``); None = off.
        max_response_len: constant divisor of ``seq-mean-token-sum-norm``.
        seq_reduce: sum of a per-sequence ``[B]`` tensor over the context-parallel group.
    """
    shape = logp.shape
    if logp.dim() != 2:
        raise ValueError(f"logp must be [batch, seq], got shape {tuple(shape)}")
    for name, t in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp),
                    ("rollout_logp", rollout_logp)):
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, logp has {tuple(shape)}")
    if advantages.shape not in (shape[:1], shape):
        raise ValueError(f"advantages must be [batch] or [batch, seq] = {tuple(shape)}, "
                         f"got {tuple(advantages.shape)}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"unknown ratio_level {ratio_level!r}; expected one of "
                         f"{RATIO_LEVELS}")
    _check_loss_agg(loss_agg, max_response_len)
    if clip_low < 0.0 or clip_high < 0.0:
        raise ValueError(f"need clip_low >= 0 and clip_high >= 0, got clip_low="
                         f"{clip_low}, clip_high={clip_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (Ye et al. 2020), got {dual_clip}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kl_estimator!r}; expected one of "
                         f"{KL_ESTIMATORS}")
    if kl_coef != 0.0 and ref_logp is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logp (the reference model's logprobs)")
    if tis_cap is not None:
        if rollout_logp is None:
            raise ValueError("tis_cap is set but rollout_logp (the generation engine's "
                             "logprobs) was not given")
        if tis_cap <= 0.0:
            raise ValueError(f"tis_cap must be > 0, got {tis_cap}")

    # Masked positions may hold anything (padding, inf); zero every input there so all
    # intermediate values stay finite and no nan can leak into a gradient.
    valid = mask > 0
    zeros = torch.zeros_like(logp)
    logp = torch.where(valid, logp, zeros)
    old_logp = torch.where(valid, old_logp, zeros)
    adv = advantages.to(logp.dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1).expand(shape)
    adv = torch.where(valid, adv, zeros)

    token_log_ratio = logp - old_logp
    if ratio_level == "token":
        log_ratio = token_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    else:
        wide = torch.promote_types(logp.dtype, torch.float32)
        seq_sum = token_log_ratio.detach().to(wide).sum(dim=-1)
        seq_tokens = valid.sum(dim=-1).to(wide)
        if seq_reduce is not None:
            seq_sum, seq_tokens = seq_reduce(seq_sum), seq_reduce(seq_tokens)
        seq_log_ratio = (seq_sum / seq_tokens.clamp_min(1)).clamp(-LOG_RATIO_CLAMP,
                                                                  LOG_RATIO_CLAMP)
        # GSPO-token: value s_i on every token, gradient s_i * grad logp_t.
        log_ratio = seq_log_ratio.to(logp.dtype).unsqueeze(-1) + (logp - logp.detach())
    ratio = torch.exp(log_ratio)

    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    clipped = pg_clipped > pg_unclipped
    pg = torch.where(clipped, pg_clipped, pg_unclipped)
    if dual_clip is not None:
        pg_dual = -adv * dual_clip
        dual = (adv < 0) & (pg_dual < pg)
        pg = torch.where(dual, pg_dual, pg)
    else:
        dual = torch.zeros_like(valid)

    if tis_cap is not None:
        assert rollout_logp is not None
        with torch.no_grad():
            tis_log = old_logp - torch.where(valid, rollout_logp, zeros)
            tis_raw = torch.exp(tis_log.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
            tis_weight = tis_raw.clamp(max=tis_cap)
            tis_capped = tis_raw > tis_cap
        pg = pg * tis_weight
    else:
        tis_weight, tis_capped = torch.ones_like(logp), torch.zeros_like(valid)

    per_token = pg
    if ref_logp is not None:
        kl = kl_penalty(logp, torch.where(valid, ref_logp, zeros), kl_estimator)
        if kl_coef != 0.0:
            per_token = per_token + kl_coef * kl
    else:
        kl = zeros

    numerator, denominator = aggregate_terms(per_token, mask, loss_agg, max_response_len,
                                             seq_reduce)

    with torch.no_grad():
        sdtype = torch.promote_types(logp.dtype, torch.float32)

        def tsum(x: Tensor) -> Tensor:
            return torch.where(valid, x.detach().to(sdtype), 0.0).sum()

        k3_old = kl_penalty(old_logp.detach(), logp.detach(), "k3")
        stat_sums = {
            "clip_frac": tsum(clipped),
            "clip_frac_low": tsum(clipped & (adv < 0)),
            "clip_frac_high": tsum(clipped & (adv > 0)),
            "dual_clip_frac": tsum(dual),
            "ratio_mean": tsum(ratio),
            "ppo_kl": tsum(-token_log_ratio),
            "ppo_kl_k3": tsum(k3_old),
            "kl_ref": tsum(kl),
            "tis_weight_mean": tsum(tis_weight),
            "tis_clip_frac": tsum(tis_capped),
            "tokens": valid.sum().to(sdtype),
        }
    return PolicyLossTerms(numerator, denominator, stat_sums)


def finalize_stats(stat_sums: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Token means from (possibly microbatch- and rank-summed) ``stat_sums``."""
    tokens = stat_sums["tokens"].clamp_min(1)
    return {k: v / tokens for k, v in stat_sums.items() if k != "tokens"}


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None = None,
    ratio_level: RatioLevel | str = "token",
    loss_agg: LossAgg | str = "token-mean",
    ref_logp: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator | str = "k3",
    rollout_logp: Tensor | None = None,
    tis_cap: float | None = None,
    max_response_len: int | None = None,
    seq_reduce: SeqReduce | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO loss of a whole batch: ``(scalar loss, detached stats)``.

    Arguments as :func:`policy_loss_terms`; the loss is its numerator over its
    denominator (0 when no token is a response token), the stats are token means keyed
    by :data:`STAT_KEYS`.
    """
    terms = policy_loss_terms(
        logp, old_logp, advantages, mask, clip_low=clip_low, clip_high=clip_high,
        dual_clip=dual_clip, ratio_level=ratio_level, loss_agg=loss_agg, ref_logp=ref_logp,
        kl_coef=kl_coef, kl_estimator=kl_estimator, rollout_logp=rollout_logp,
        tis_cap=tis_cap, max_response_len=max_response_len, seq_reduce=seq_reduce)
    loss = terms.numerator / terms.denominator.clamp_min(1).to(terms.numerator.dtype)
    return loss, finalize_stats(terms.stat_sums)


def loss_kwargs_from_config(cfg: Any, max_response_len: int | None = None) -> dict[str, Any]:
    """Keyword arguments of :func:`policy_loss` from a ``GRPOConfig``.

    With ``kl_in_reward`` the KL goes into the rewards, so the loss term is off
    (``kl_coef=0``); ``max_response_len`` (``rollout.max_new_tokens``) is not a GRPO field.
    """
    return {
        "clip_low": float(cfg.clip_low),
        "clip_high": float(cfg.clip_high),
        "dual_clip": None if cfg.dual_clip is None else float(cfg.dual_clip),
        "ratio_level": cfg.ratio_level,
        "loss_agg": cfg.loss_agg,
        "kl_coef": 0.0 if cfg.kl_in_reward else float(cfg.kl_coef),
        "kl_estimator": cfg.kl_estimator,
        "tis_cap": None if cfg.tis_cap is None else float(cfg.tis_cap),
        "max_response_len": max_response_len,
    }


__all__ = ["LOSS_AGGS", "RATIO_LEVELS", "STAT_KEYS", "LossAgg", "PolicyLossTerms",
           "RatioLevel", "SeqReduce", "aggregate", "aggregate_terms", "finalize_stats",
           "loss_kwargs_from_config", "policy_loss", "policy_loss_terms"]
