"""Per-token KL estimators between the policy and the reference model.

The three estimators are from John Schulman, "Approximating KL Divergence" (2020,
http://joschu.net/blog/kl-approx.html). Tokens are sampled from the policy ``pi``, and with
``log_ratio = logp - ref_logp = log pi(y_t) - log ref(y_t)`` each estimator's expectation
under ``pi`` approximates the reverse KL ``KL(pi || ref)``:

* ``k1 = log_ratio``: unbiased, high variance, can be negative per token.
* ``k2 = 0.5 * log_ratio**2``: biased, low variance, always >= 0.
* ``k3 = exp(-log_ratio) - 1 + log_ratio``: with ``r = ref / pi = exp(-log_ratio)`` this
  is ``r - 1 - log r``; unbiased and always >= 0. It is the estimator GRPO uses
  (DeepSeekMath, Shao et al. 2024, eq. 4). It is evaluated as ``expm1(-x) + x``: near the
  reference (``|x|`` ~ 1e-3, where k3 ~ x^2 / 2 ~ 5e-7) ``exp(-x) - 1`` in float32 is
  accurate only to an absolute ~1e-7, a 10-20% error on each token's value (and on the
  reported KL); ``expm1`` is accurate to a relative 1e-7, leaving only the cancellation
  against ``x`` (an absolute ~1e-7 |x|). The gradient ``1 - exp(-x)`` keeps an absolute
  float32 error of ~1e-7, negligible next to the policy-gradient term.

``log_ratio`` is clamped to ``[-clamp, clamp]`` (20 by default, as verl does) before the
estimator so that a token where the two models disagree wildly (``exp(20)`` is about
5e8) cannot overflow ``exp`` to ``inf`` and poison the loss with ``inf``/``nan``; the
clamp has no effect on ordinary tokens and zeroes the gradient only beyond it. Pass
``clamp=None`` to turn it off.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")
LOG_RATIO_CLAMP = 20.0


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: KLEstimator | str = "k3",
               clamp: float | None = LOG_RATIO_CLAMP) -> Tensor:
    """Per-token estimate of ``KL(pi || ref)`` (Schulman 2020), same shape as ``logp``.

    Args:
        logp: log-probabilities of the sampled tokens under the policy (differentiable).
        ref_logp: log-probabilities of the same tokens under the reference model.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (see the module docstring).
        clamp: bound on ``|logp - ref_logp|`` before the estimator; ``None`` for none.
    """
    log_ratio = logp - ref_logp
    if clamp is not None:
        log_ratio = log_ratio.clamp(-clamp, clamp)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def kl_reward_penalty(logp: Tensor, ref_logp: Tensor, mask: Tensor, coef: float,
                      estimator: KLEstimator | str = "k3",
                      clamp: float | None = LOG_RATIO_CLAMP) -> Tensor:
    """Per-sequence KL penalty ``coef * sum_t kl_t * mask_t``, shape ``[batch]``, detached.

    For ``grpo.kl_in_reward``: the caller subtracts it from each sequence's reward before
    the group advantages are computed (the PPO-RLHF convention of Ouyang et al. 2022 /
    Stiennon et al. 2020, applied per sequence), instead of adding a KL loss term.
    """
    with torch.no_grad():
        kl = kl_penalty(logp.detach(), ref_logp.detach(), estimator, clamp)
        kl = torch.where(mask > 0, kl, torch.zeros_like(kl))
        return coef * (kl * mask).sum(dim=-1)


__all__ = ["KL_ESTIMATORS", "KLEstimator", "LOG_RATIO_CLAMP", "kl_penalty", "kl_reward_penalty"]
