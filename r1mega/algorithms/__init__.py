"""GRPO algorithm math on per-token tensors: advantages, KL estimators, the policy loss.

Pure PyTorch, no distributed state: the trainer applies these on the last pipeline
stage to per-token log-probabilities. See each module for the papers behind each
variant.
"""

from r1mega.algorithms.advantages import (
    ADVANTAGES,
    AdvantageKind,
    compute_advantages,
    group_advantages,
    keep_mask,
    uniform_groups,
)
from r1mega.algorithms.entropy import entropy_from_logits
from r1mega.algorithms.kl import (
    KL_ESTIMATORS,
    LOG_RATIO_CLAMP,
    KLEstimator,
    kl_penalty,
    kl_reward_penalty,
)
from r1mega.algorithms.policy_loss import (
    LOSS_AGGS,
    RATIO_LEVELS,
    STAT_KEYS,
    LossAgg,
    PolicyLossTerms,
    RatioLevel,
    SeqReduce,
    aggregate,
    aggregate_terms,
    finalize_stats,
    loss_kwargs_from_config,
    policy_loss,
    policy_loss_terms,
)

__all__ = [
    "ADVANTAGES",
    "KL_ESTIMATORS",
    "LOG_RATIO_CLAMP",
    "LOSS_AGGS",
    "RATIO_LEVELS",
    "STAT_KEYS",
    "AdvantageKind",
    "KLEstimator",
    "LossAgg",
    "PolicyLossTerms",
    "RatioLevel",
    "SeqReduce",
    "aggregate",
    "aggregate_terms",
    "compute_advantages",
    "entropy_from_logits",
    "finalize_stats",
    "group_advantages",
    "keep_mask",
    "kl_penalty",
    "kl_reward_penalty",
    "loss_kwargs_from_config",
    "policy_loss",
    "policy_loss_terms",
    "uniform_groups",
]
