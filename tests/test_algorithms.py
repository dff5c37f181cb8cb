"""Tests for r1mega.algorithms: GRPO advantages, KL estimators, the policy loss, entropy.

Every variant is checked against an independent reference written here with explicit
Python loops over groups, sequences and tokens (scalar arithmetic, ``if`` branches for
the clips), on small hand-made float64 inputs; gradients are compared via autograd
through that loop reference.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from r1mega.algorithms import (
    STAT_KEYS,
    compute_advantages,
    entropy_from_logits,
    finalize_stats,
    group_advantages,
    keep_mask,
    kl_penalty,
    kl_reward_penalty,
    loss_kwargs_from_config,
    policy_loss,
    policy_loss_terms,
    uniform_groups,
)
from r1mega.config.schema import GRPOConfig

F64 = torch.float64
ATOL = 1e-10


def close(a: Any, b: Any, atol: float = ATOL) -> bool:
    a = torch.as_tensor(a, dtype=F64)
    b = torch.as_tensor(b, dtype=F64)
    return torch.allclose(a, b, rtol=1e-6, atol=atol)


# --------------------------------------------------------------------------- advantages


def ref_group_advantages(rewards: list[float], g: int, normalize_std: bool,
                         eps: float = 1e-6) -> list[float]:
    out: list[float] = []
    for start in range(0, len(rewards), g):
        group = rewards[start:start + g]
        mean = sum(group) / g
        var = sum((r - mean) ** 2 for r in group) / (g - 1)  # unbiased
        for r in group:
            if all(x == group[0] for x in group):
                out.append(0.0)
            elif normalize_std:
                out.append((r - mean) / (math.sqrt(var) + eps))
            else:
                out.append(r - mean)
    return out


REWARDS = [1.0, 0.0, 0.0, 1.0, 0.1, 0.1, 0.1, 0.1, 0.0, 0.0, 0.0, 1.0]  # group 2 uniform


def test_group_advantages_grpo_matches_loop_reference() -> None:
    adv = group_advantages(torch.tensor(REWARDS, dtype=F64), 4)
    assert close(adv, ref_group_advantages(REWARDS, 4, True))
    # Known values: group [1,0,0,1] has mean .5 and unbiased std sqrt(1/3).
    s = math.sqrt(1 / 3) + 1e-6
    assert close(adv[:4], [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s])


def test_uniform_group_has_exactly_zero_advantage_and_is_flagged() -> None:
    r = torch.tensor(REWARDS, dtype=F64)
    adv = group_advantages(r, 4)
    assert torch.equal(adv[4:8], torch.zeros(4, dtype=F64))  # exact, no 0/eps round-off
    assert uniform_groups(r, 4).tolist() == [False, True, False]
    assert keep_mask(r, 4).tolist() == [True] * 4 + [False] * 4 + [True] * 4
    assert torch.isfinite(adv).all()


def test_dr_grpo_advantages_are_mean_centred_only() -> None:
    r = torch.tensor(REWARDS, dtype=F64)
    adv = group_advantages(r, 4, normalize_std=False)
    assert close(adv, ref_group_advantages(REWARDS, 4, False))
    assert close(adv[8:], [-0.25, -0.25, -0.25, 0.75])


def test_compute_advantages_dispatch_uses_config() -> None:
    r = torch.tensor(REWARDS, dtype=F64)
    grpo = compute_advantages(r, GRPOConfig(group_size=4))
    assert close(grpo, ref_group_advantages(REWARDS, 4, True))
    no_std = compute_advantages(r, GRPOConfig(group_size=4, normalize_std=False))
    assert close(no_std, ref_group_advantages(REWARDS, 4, False))
    # dr_grpo never divides by the std, even with normalize_std=True.
    dr = compute_advantages(r, GRPOConfig(group_size=4, advantage="dr_grpo",
                                          normalize_std=True))
    assert close(dr, ref_group_advantages(REWARDS, 4, False))
    with pytest.raises(ValueError, match="unknown grpo.advantage 'ppo'"):
        compute_advantages(r, GRPOConfig(group_size=4, advantage="ppo"))


def test_group_advantages_errors_and_edge_cases() -> None:
    with pytest.raises(ValueError, match="do not split into groups of group_size=5"):
        group_advantages(torch.zeros(12), 5)
    assert torch.equal(group_advantages(torch.tensor([3.0, 1.0]), 1), torch.zeros(2))
    ints = group_advantages(torch.tensor([1, 0, 1, 0]), 2)  # integer rewards work
    assert ints.is_floating_point() and close(ints, ref_group_advantages([1, 0, 1, 0], 2, True))


# --------------------------------------------------------------------------- KL


LOG_RATIOS = [-1.0, 0.0, 0.5, 2.0]


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_kl_estimator_values(est: str) -> None:
    x = torch.tensor(LOG_RATIOS, dtype=F64)
    ref = torch.tensor([0.3, -0.2, 1.0, -1.5], dtype=F64)
    got = kl_penalty(ref + x, ref, est)
    want = {"k1": LOG_RATIOS,
            "k2": [0.5 * v * v for v in LOG_RATIOS],
            "k3": [math.exp(-v) - 1 + v for v in LOG_RATIOS]}[est]
    assert close(got, want)


def test_kl_k3_zero_only_at_equal_logprobs_and_clamped() -> None:
    x = torch.tensor(LOG_RATIOS, dtype=F64)
    k3 = kl_penalty(x, torch.zeros_like(x), "k3")
    assert k3[1] == 0 and (k3[[0, 2, 3]] > 0).all()
    assert close(kl_penalty(torch.zeros(1, dtype=F64), torch.zeros(1, dtype=F64), "k2"), [0.0])
    big = kl_penalty(torch.tensor([-30.0], dtype=F64), torch.zeros(1, dtype=F64), "k3")
    assert close(big, [math.exp(20) - 1 - 20])
    unclamped = kl_penalty(torch.tensor([-30.0], dtype=F64), torch.zeros(1, dtype=F64), "k3",
                           clamp=None)
    assert close(unclamped, [math.exp(30) - 1 - 30])
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_penalty(x, x, "k4")


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_kl_reward_penalty_is_detached_per_sequence_sum(est: str) -> None:
    logp, _, _, mask = make_batch()
    ref = REF_LOGP
    got = kl_reward_penalty(logp.clone().requires_grad_(True), ref, mask, 0.05, est)
    assert not got.requires_grad and got.shape == (logp.shape[0],)
    for b in range(logp.shape[0]):
        want = 0.0
        for t in range(logp.shape[1]):
            if mask[b, t] > 0:
                want += ref_kl(float(logp[b, t]), float(ref[b, t]), est)
        assert close(got[b], 0.05 * want)


# --------------------------------------------------------------------------- batch


# 4 sequences, 7 positions: a prompt prefix (mask 0), responses of lengths 4, 2, 5, 3,
# right padding. Masked positions hold garbage that must never matter.
MASK = torch.tensor([
    [0, 0, 1, 1, 1, 1, 0],
    [0, 1, 1, 0, 0, 0, 0],
    [0, 0, 1, 1, 1, 1, 1],
    [0, 1, 1, 1, 0, 0, 0],
], dtype=F64)
LOGP = torch.tensor([
    [-9.0, -9.0, -0.5, -1.2, -0.1, -2.0, 0.0],
    [-9.0, -0.7, -0.3, 0.0, 0.0, 0.0, 0.0],
    [-9.0, -9.0, -1.0, -0.2, -0.9, -0.05, -1.7],
    [-9.0, -0.4, -2.5, -0.6, 0.0, 0.0, 0.0],
], dtype=F64)
# log ratios logp - old_logp chosen so some tokens leave [1 - 0.2, 1 + 0.28]:
# exp(0.3) = 1.35, exp(-0.3) = 0.74, exp(0.1) = 1.105, exp(-0.1) = 0.905
LOG_RATIO = torch.tensor([
    [0.0, 0.0, 0.3, -0.1, 0.05, -0.3, 0.0],
    [0.0, -0.3, 0.1, 0.0, 0.0, 0.0, 0.0],
    [0.0, 0.0, 0.3, -0.3, 0.0, 0.1, -0.05],
    [0.0, 0.2, -0.25, 1.5, 0.0, 0.0, 0.0],
], dtype=F64)
ADV = torch.tensor([0.8, -1.1, -0.4, 1.3], dtype=F64)
REF_LOGP = LOGP - torch.tensor([
    [0.0, 0.0, 0.2, -0.4, 0.1, 0.0, 0.0],
    [0.0, 0.3, -0.2, 0.0, 0.0, 0.0, 0.0],
    [0.0, 0.0, 0.5, 0.1, -0.6, 0.05, 0.2],
    [0.0, -0.1, 0.7, 0.3, 0.0, 0.0, 0.0],
], dtype=F64)
ROLLOUT_LOGP = LOGP - LOG_RATIO - torch.tensor([  # old_logp - rollout_logp
    [0.0, 0.0, 0.9, -0.2, 0.1, 0.0, 0.0],
    [0.0, 0.4, -0.3, 0.0, 0.0, 0.0, 0.0],
    [0.0, 0.0, 0.0, 1.2, -0.1, 0.3, 0.05],
    [0.0, 0.2, 0.6, -0.4, 0.0, 0.0, 0.0],
], dtype=F64)
MAX_LEN = 8


def make_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    logp = LOGP.clone()
    old = LOGP - LOG_RATIO
    old = torch.where(MASK > 0, old, torch.full_like(old, float("nan")))  # garbage
    return logp, old, ADV.clone(), MASK.clone()


def ref_kl(lp: float, rp: float, est: str) -> float:
    x = lp - rp
    if est == "k1":
        return x
    if est == "k2":
        return 0.5 * x * x
    return math.exp(-x) - 1.0 + x


def ref_loss(logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
             *, clip_low: float, clip_high: float, dual_clip: float | None = None,
             ratio_level: str = "token", loss_agg: str = "token-mean",
             ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0,
             kl_estimator: str = "k3", rollout_logp: torch.Tensor | None = None,
             tis_cap: float | None = None, max_response_len: int | None = None,
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """Loop reference: each token's loss built from 0-dim tensors (for autograd)."""
    batch, seq = logp.shape
    lpv = logp.detach()  # plain values, for the non-differentiated parts
    per_seq: list[list[torch.Tensor]] = []
    counts = {"clip": 0, "low": 0, "high": 0, "dual": 0, "tokens": 0}
    sums = {"ratio": 0.0, "ppo_kl": 0.0, "kl_ref": 0.0, "tis": 0.0}
    for b in range(batch):
        toks = [t for t in range(seq) if mask[b, t] > 0]
        a = float(adv[b])
        s_i = 0.0
        if ratio_level == "sequence" and toks:
            s_i = math.exp(sum(float(lpv[b, t]) - float(old[b, t]) for t in toks) / len(toks))
        losses = []
        for t in toks:
            lp = logp[b, t]
            if ratio_level == "token":
                r = torch.exp(lp - float(old[b, t]))
            else:
                r = s_i * torch.exp(lp - lp.detach())  # value s_i, d r / d lp = s_i
            rv = float(r.detach())
            rc = min(max(rv, 1 - clip_low), 1 + clip_high)
            l_unclipped = -a * r
            l_clipped = -a * rc  # constant: no gradient through a clipped ratio
            if -a * rc > -a * rv:
                loss_t: torch.Tensor | float = l_clipped
                loss_value = -a * rc
                counts["clip"] += 1
                counts["low" if a < 0 else "high"] += 1
            else:
                loss_t = l_unclipped
                loss_value = -a * rv
            if dual_clip is not None and a < 0 and -a * dual_clip < loss_value:
                loss_t = -a * dual_clip
                counts["dual"] += 1
            w = 1.0
            if tis_cap is not None:
                assert rollout_logp is not None
                w = min(math.exp(float(old[b, t]) - float(rollout_logp[b, t])), tis_cap)
            loss_t = loss_t * w
            if ref_logp is not None:
                x = lp - float(ref_logp[b, t])
                kl = {"k1": x, "k2": 0.5 * x * x, "k3": torch.exp(-x) - 1 + x}[kl_estimator]
                sums["kl_ref"] += float(kl.detach())
                loss_t = loss_t + kl_coef * kl
            losses.append(torch.as_tensor(loss_t, dtype=F64))
            counts["tokens"] += 1
            sums["ratio"] += rv
            sums["ppo_kl"] += float(old[b, t]) - float(lpv[b, t])
            sums["tis"] += w
        per_seq.append(losses)
    nonempty = [ls for ls in per_seq if ls]
    if loss_agg == "token-mean":
        total = sum((lt for ls in per_seq for lt in ls), torch.zeros((), dtype=F64))
        loss = total / counts["tokens"]
    elif loss_agg == "seq-mean-token-mean":
        loss = sum((sum(ls) / len(ls) for ls in nonempty), torch.zeros((), dtype=F64))
        loss = loss / len(nonempty)
    else:
        assert max_response_len is not None
        loss = sum((sum(ls) / max_response_len for ls in nonempty), torch.zeros((), dtype=F64))
        loss = loss / len(nonempty)
    n = counts["tokens"]
    stats = {"clip_frac": counts["clip"] / n, "clip_frac_low": counts["low"] / n,
             "clip_frac_high": counts["high"] / n, "dual_clip_frac": counts["dual"] / n,
             "ratio_mean": sums["ratio"] / n, "ppo_kl": sums["ppo_kl"] / n,
             "kl_ref": sums["kl_ref"] / n, "tis_weight_mean": sums["tis"] / n}
    return loss, stats


AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
VARIANTS: dict[str, dict[str, Any]] = {
    "ppo_symmetric": {"clip_low": 0.2, "clip_high": 0.2},
    "clip_higher": {"clip_low": 0.2, "clip_high": 0.28},
    "dual_clip": {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": 1.3},
    "dual_clip_gspo": {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": 1.005,
                       "ratio_level": "sequence"},
    "gspo": {"clip_low": 0.02, "clip_high": 0.03, "ratio_level": "sequence"},
    "gspo_wide": {"clip_low": 0.5, "clip_high": 0.5, "ratio_level": "sequence"},
    "kl_k1": {"clip_low": 0.2, "clip_high": 0.28, "kl_coef": 0.1, "kl_estimator": "k1"},
    "kl_k2": {"clip_low": 0.2, "clip_high": 0.28, "kl_coef": 0.1, "kl_estimator": "k2"},
    "kl_k3": {"clip_low": 0.2, "clip_high": 0.28, "kl_coef": 0.1, "kl_estimator": "k3"},
    "tis": {"clip_low": 0.2, "clip_high": 0.28, "tis_cap": 2.0},
    "everything": {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": 1.2, "kl_coef": 0.05,
                   "tis_cap": 1.5},
    "everything_gspo": {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": 1.2,
                        "kl_coef": 0.05, "tis_cap": 1.5, "ratio_level": "sequence"},
}


def full_kwargs(variant: str, agg: str) -> dict[str, Any]:
    kw = dict(VARIANTS[variant], loss_agg=agg, max_response_len=MAX_LEN)
    if kw.get("kl_coef"):
        kw["ref_logp"] = REF_LOGP
    if kw.get("tis_cap"):
        kw["rollout_logp"] = ROLLOUT_LOGP
    return kw


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_policy_loss_value_gradient_and_stats_match_loop_reference(variant: str,
                                                                   agg: str) -> None:
    kw = full_kwargs(variant, agg)
    logp, old, adv, mask = make_batch()
    logp.requires_grad_(True)
    loss, stats = policy_loss(logp, old, adv, mask, **kw)
    (grad,) = torch.autograd.grad(loss, logp)

    ref_lp = LOGP.clone().requires_grad_(True)
    want, want_stats = ref_loss(ref_lp, LOGP - LOG_RATIO, adv, mask, **kw)
    (want_grad,) = torch.autograd.grad(want, ref_lp)

    assert close(loss, want), (float(loss), float(want))
    assert close(grad, want_grad)
    assert torch.isfinite(grad).all() and (grad[mask == 0] == 0).all()
    assert set(stats) == set(STAT_KEYS)
    for key, value in want_stats.items():
        assert close(stats[key], value), key
    assert all(not v.requires_grad for v in stats.values())


def test_aggregation_modes_differ_on_unequal_lengths() -> None:
    logp, old, adv, mask = make_batch()
    losses = {agg: policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28,
                               loss_agg=agg, max_response_len=MAX_LEN)[0] for agg in AGGS}
    values = [float(v) for v in losses.values()]
    assert len({round(v, 8) for v in values}) == 3, values
    # With ratio 1 everywhere the loss is -mean(A) under each weighting.
    ones = LOGP.clone()
    lens = [4, 2, 5, 3]
    a = ADV.tolist()
    expect = {
        "token-mean": -sum(ai * n for ai, n in zip(a, lens, strict=True)) / sum(lens),
        "seq-mean-token-mean": -sum(a) / 4,
        "seq-mean-token-sum-norm": -sum(ai * n / MAX_LEN for ai, n in zip(a, lens,
                                                                           strict=True)) / 4,
    }
    for agg in AGGS:
        got, _ = policy_loss(ones, ones, adv, mask, clip_low=0.2, clip_high=0.2,
                             loss_agg=agg, max_response_len=MAX_LEN)
        assert close(got, expect[agg]), agg


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("split", [2, 1, 3])
def test_microbatch_sum_form_reproduces_full_batch(variant: str, agg: str,
                                                   split: int) -> None:
    kw = full_kwargs(variant, agg)
    logp, old, adv, mask = make_batch()
    logp.requires_grad_(True)
    full, full_stats = policy_loss(logp, old, adv, mask, **kw)
    (full_grad,) = torch.autograd.grad(full, logp)

    nums, dens, stat_sums = [], [], []
    for sl in (slice(0, split), slice(split, None)):
        mkw = {k: (v[sl] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        terms = policy_loss_terms(logp[sl], old[sl], adv[sl], mask[sl], **mkw)
        assert terms.denominator.dtype == torch.int and terms.denominator.dim() == 0
        nums.append(terms.numerator)
        dens.append(terms.denominator)
        stat_sums.append(terms.stat_sums)
    total = sum(nums) / sum(dens)
    (grad,) = torch.autograd.grad(total, logp)
    assert close(total, full)
    assert close(grad, full_grad)
    summed = {k: sum(s[k] for s in stat_sums) for k in stat_sums[0]}
    for key, value in finalize_stats(summed).items():
        assert close(value, full_stats[key]), key
    expected_den = int(MASK.sum()) if agg == "token-mean" else 4
    assert int(sum(dens)) == expected_den


# --------------------------------------------------------------------------- single cases


def single_token_batch(ratios: list[float], advs: list[float]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    logp = torch.full((len(ratios), 1), -1.0, dtype=F64, requires_grad=True)
    old = -1.0 - torch.log(torch.tensor(ratios, dtype=F64)).unsqueeze(-1)
    return logp, old, torch.tensor(advs, dtype=F64), torch.ones_like(old)


def test_clip_higher_clips_exactly_the_expected_tokens() -> None:
    # clip range [0.8, 1.28]: which tokens are clipped depends on ratio and sign of A.
    ratios = [1.25, 1.30, 0.85, 0.75, 1.30, 0.75]
    advs = [1.0, 1.0, -1.0, -1.0, -1.0, 1.0]
    clipped = [False, True, False, True, False, False]
    logp, old, adv, mask = single_token_batch(ratios, advs)
    loss, stats = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28,
                              loss_agg="seq-mean-token-mean")
    (grad,) = torch.autograd.grad(loss, logp)
    per_token = [-a * (min(max(r, 0.8), 1.28) if c else r)
                 for r, a, c in zip(ratios, advs, clipped, strict=True)]
    assert close(loss, sum(per_token) / 6)
    for i, c in enumerate(clipped):  # clipped tokens get no gradient, the others -A*r/6
        assert close(grad[i, 0], 0.0 if c else -advs[i] * ratios[i] / 6)
    assert close(stats["clip_frac"], 2 / 6)
    assert close(stats["clip_frac_high"], 1 / 6) and close(stats["clip_frac_low"], 1 / 6)
    # The same ratios under symmetric clipping 0.2/0.2 also clip token 0 (1.25 > 1.2).
    _, sym = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    assert close(sym["clip_frac"], 3 / 6)


def test_dual_clip_bounds_negative_advantage_tokens() -> None:
    ratios = [5.0, 2.0, 5.0, 0.5]
    advs = [-1.0, -1.0, 2.0, -1.0]
    logp, old, adv, mask = single_token_batch(ratios, advs)
    loss, stats = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2,
                              dual_clip=3.0, loss_agg="seq-mean-token-mean")
    (grad,) = torch.autograd.grad(loss, logp)
    # token 0: -A*r = 5 > -A*3 = 3 -> dual clipped to 3, no grad
    # token 1: -A*r = 2 < 3 -> plain unclipped loss 2 (A<0, r above range: no PPO clip)
    # token 2: A>0, r clipped to 1.2 -> -2.4, no grad; dual clip never applies to A>0
    # token 3: A<0, r=0.5 clipped to 0.8 -> 0.8, no grad
    assert close(loss, (3.0 + 2.0 - 2.4 + 0.8) / 4)
    assert close(grad[:, 0], [0.0, -advs[1] * 2.0 / 4, 0.0, 0.0])
    assert close(stats["dual_clip_frac"], 1 / 4)
    assert close(stats["clip_frac"], 2 / 4)
    no_dual, _ = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2,
                             loss_agg="seq-mean-token-mean")
    assert close(no_dual, (5.0 + 2.0 - 2.4 + 0.8) / 4)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2, dual_clip=0.9)


def test_gspo_sequence_ratio_and_equal_token_gradients() -> None:
    logp, old, adv, mask = make_batch()
    logp.requires_grad_(True)
    # A clip range wide enough that no sequence is clipped.
    loss, stats = policy_loss(logp, old, adv, mask, clip_low=0.99, clip_high=10.0,
                              ratio_level="sequence", loss_agg="token-mean")
    (grad,) = torch.autograd.grad(loss, logp)
    n_total = int(MASK.sum())
    ratio_sum = 0.0
    for b in range(4):
        toks = [t for t in range(7) if MASK[b, t] > 0]
        s_b = math.exp(sum(float(LOG_RATIO[b, t]) for t in toks) / len(toks))
        ratio_sum += s_b * len(toks)
        for t in range(7):  # every response token: same gradient -A_b * s_b / N
            want = -float(ADV[b]) * s_b / n_total if t in toks else 0.0
            assert close(grad[b, t], want), (b, t)
    assert close(stats["ratio_mean"], ratio_sum / n_total)

    # One sequence alone: the stat ratio is exactly s = exp(mean log ratio).
    _, one = policy_loss(logp[:1], old[:1], adv[:1], mask[:1], clip_low=0.2, clip_high=0.2,
                         ratio_level="sequence")
    assert close(one["ratio_mean"], math.exp((0.3 - 0.1 + 0.05 - 0.3) / 4))

    # GSPO's small clip range: s_3 = exp(1.45/3) = 1.62 > 1.0004 with A > 0 -> the whole
    # sequence is clipped and gets no gradient; the token-level ratio would not do that.
    loss, stats = policy_loss(logp, old, adv, mask, clip_low=3e-4, clip_high=4e-4,
                              ratio_level="sequence")
    (grad,) = torch.autograd.grad(loss, logp)
    assert (grad[3] == 0).all()
    assert close(stats["clip_frac_high"], 3 / n_total)


def test_kl_term_is_added_with_the_same_aggregation() -> None:
    logp, old, adv, mask = make_batch()
    for agg in AGGS:
        for est in ("k1", "k2", "k3"):
            base, _ = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28,
                                  loss_agg=agg, max_response_len=MAX_LEN)
            with_kl, stats = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28,
                                         loss_agg=agg, max_response_len=MAX_LEN,
                                         ref_logp=REF_LOGP, kl_coef=0.3, kl_estimator=est)
            seq_kls = []
            for b in range(4):
                toks = [t for t in range(7) if MASK[b, t] > 0]
                seq_kls.append([ref_kl(float(LOGP[b, t]), float(REF_LOGP[b, t]), est)
                                for t in toks])
            if agg == "token-mean":
                agg_kl = sum(map(sum, seq_kls)) / sum(map(len, seq_kls))
            elif agg == "seq-mean-token-mean":
                agg_kl = sum(sum(k) / len(k) for k in seq_kls) / 4
            else:
                agg_kl = sum(sum(k) / MAX_LEN for k in seq_kls) / 4
            assert close(with_kl - base, 0.3 * agg_kl), (agg, est)
            assert close(stats["kl_ref"], sum(map(sum, seq_kls)) / sum(map(len, seq_kls)))


def test_tis_weights_multiply_the_policy_loss() -> None:
    logp, old, adv, mask = make_batch()
    base, base_stats = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28,
                                   loss_agg="seq-mean-token-mean")
    assert close(base_stats["tis_weight_mean"], 1.0)
    # rollout == old: every weight is 1, the loss is unchanged.
    same, _ = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28,
                          loss_agg="seq-mean-token-mean", rollout_logp=LOGP - LOG_RATIO,
                          tis_cap=2.0)
    assert close(same, base)
    _, stats = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28,
                           rollout_logp=ROLLOUT_LOGP, tis_cap=2.0)
    diff = (LOGP - LOG_RATIO) - ROLLOUT_LOGP
    weights = [min(math.exp(float(diff[b, t])), 2.0) for b in range(4) for t in range(7)
               if MASK[b, t] > 0]
    capped = [math.exp(float(diff[b, t])) > 2.0 for b in range(4) for t in range(7)
              if MASK[b, t] > 0]
    assert sum(capped) == 2  # exp(0.9) and exp(1.2) exceed the cap
    assert close(stats["tis_weight_mean"], sum(weights) / len(weights))
    assert close(stats["tis_clip_frac"], sum(capped) / len(capped))
    with pytest.raises(ValueError, match="rollout_logp"):
        policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2, tis_cap=2.0)


def test_stats_ppo_kl_and_first_epoch_values() -> None:
    logp, old, adv, mask = make_batch()
    _, stats = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    toks = [(b, t) for b in range(4) for t in range(7) if MASK[b, t] > 0]
    lr = [float(LOG_RATIO[b, t]) for b, t in toks]
    assert close(stats["ppo_kl"], -sum(lr) / len(lr))
    assert close(stats["ppo_kl_k3"], sum(math.exp(x) - 1 - x for x in lr) / len(lr))
    # First epoch: logp == old_logp -> ratio 1, nothing clipped, loss = -token-mean(A).
    loss, first = policy_loss(LOGP, LOGP, adv, mask, clip_low=0.2, clip_high=0.28)
    assert close(first["ratio_mean"], 1.0) and close(first["clip_frac"], 0.0)
    assert close(first["ppo_kl"], 0.0) and close(first["kl_ref"], 0.0)


def test_garbage_at_masked_positions_never_leaks() -> None:
    logp, old, adv, mask = make_batch()
    bad_logp = torch.where(MASK > 0, LOGP, torch.full_like(LOGP, float("-inf")))
    bad_logp.requires_grad_(True)
    bad_ref = torch.where(MASK > 0, REF_LOGP, torch.full_like(LOGP, float("nan")))
    for agg in AGGS:
        for level in ("token", "sequence"):
            loss, stats = policy_loss(bad_logp, old, adv, mask, clip_low=0.2, clip_high=0.28,
                                      ratio_level=level, loss_agg=agg,
                                      max_response_len=MAX_LEN, ref_logp=bad_ref,
                                      kl_coef=0.1, rollout_logp=bad_ref, tis_cap=2.0)
            (grad,) = torch.autograd.grad(loss, bad_logp)
            assert torch.isfinite(loss) and torch.isfinite(grad).all()
            assert all(torch.isfinite(v) for v in stats.values())


def test_empty_mask_and_empty_rows() -> None:
    logp, old, adv, mask = make_batch()
    zero = torch.zeros_like(mask)
    for agg in AGGS:
        loss, _ = policy_loss(logp, old, adv, zero, clip_low=0.2, clip_high=0.2,
                              loss_agg=agg, max_response_len=MAX_LEN)
        assert loss == 0
    # A dropped (all-zero) row is left out of the sequence means.
    dropped = mask.clone()
    dropped[1] = 0
    for agg in AGGS:
        loss, _ = policy_loss(logp, old, adv, dropped, clip_low=0.2, clip_high=0.28,
                              loss_agg=agg, max_response_len=MAX_LEN)
        keep = [0, 2, 3]
        want, _ = ref_loss(LOGP[keep], (LOGP - LOG_RATIO)[keep], adv[keep], mask[keep],
                           clip_low=0.2, clip_high=0.28, loss_agg=agg,
                           max_response_len=MAX_LEN)
        assert close(loss, want), agg


def test_policy_loss_argument_errors() -> None:
    logp, old, adv, mask = make_batch()
    with pytest.raises(ValueError, match="max_response_len"):
        policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2,
                    loss_agg="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="unknown loss_agg 'mean'"):
        policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2, loss_agg="mean")
    with pytest.raises(ValueError, match="unknown ratio_level 'group'"):
        policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2, ratio_level="group")
    with pytest.raises(ValueError, match="needs ref_logp"):
        policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2, kl_coef=0.1)
    with pytest.raises(ValueError, match="old_logp has shape"):
        policy_loss(logp, old[:, :3], adv, mask, clip_low=0.2, clip_high=0.2)
    with pytest.raises(ValueError, match="advantages must be"):
        policy_loss(logp, old, adv[:3], mask, clip_low=0.2, clip_high=0.2)


def test_per_token_advantages_equal_broadcast_ones() -> None:
    logp, old, adv, mask = make_batch()
    a, _ = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    b, _ = policy_loss(logp, old, adv[:, None].expand(-1, 7), mask, clip_low=0.2,
                       clip_high=0.28)
    assert close(a, b)


def test_loss_kwargs_from_config() -> None:
    cfg = GRPOConfig(clip_low=0.2, clip_high=0.28, dual_clip=3.0, loss_agg="token-mean",
                     kl_coef=0.01, kl_estimator="k2", tis_cap=2.0)
    kw = loss_kwargs_from_config(cfg, max_response_len=64)
    assert kw == {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": 3.0,
                  "ratio_level": "token", "loss_agg": "token-mean", "kl_coef": 0.01,
                  "kl_estimator": "k2", "tis_cap": 2.0, "max_response_len": 64}
    assert loss_kwargs_from_config(GRPOConfig(kl_in_reward=True))["kl_coef"] == 0.0


# --------------------------------------------------------------------------- entropy


def ref_entropy(row: list[float]) -> float:
    m = max(row)
    z = sum(math.exp(v - m) for v in row)
    h = 0.0
    for v in row:
        p = math.exp(v - m) / z
        if p > 0:
            h -= p * math.log(p)
    return h


def test_entropy_matches_loop_reference_and_is_stable() -> None:
    logits = torch.tensor([[[0.1, -2.0, 3.0, 0.5], [0.0, 0.0, 0.0, 0.0]],
                           [[1000.0, 1001.0, 999.0, -1000.0], [5.0, -5.0, 2.0, 2.0]]],
                          dtype=F64)
    h = entropy_from_logits(logits)
    assert h.shape == (2, 2)
    for i in range(2):
        for j in range(2):
            assert close(h[i, j], ref_entropy(logits[i, j].tolist()))
    assert close(h[0, 1], math.log(4))


def test_entropy_with_masked_vocab_and_half_precision() -> None:
    logits = torch.tensor([[0.3, float("-inf"), 1.2, float("-inf")]], dtype=F64,
                          requires_grad=True)
    h = entropy_from_logits(logits)
    (grad,) = torch.autograd.grad(h.sum(), logits)
    assert close(h, [ref_entropy([0.3, 1.2])])
    assert torch.isfinite(h).all() and torch.isfinite(grad).all()
    # dH/dz_v = -p_v (log p_v + H) on the finite entries
    p = torch.softmax(logits.detach(), -1)
    want = -p * (torch.log(p.clamp_min(1e-300)) + h.detach()[:, None])
    assert close(grad[0, [0, 2]], want[0, [0, 2]])
    bf = entropy_from_logits(torch.randn(3, 50).to(torch.bfloat16))
    assert bf.dtype == torch.float32 and torch.isfinite(bf).all()
