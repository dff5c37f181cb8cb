"""Optimizer and learning-rate schedule: megatron-core's, configured from ``train``.

Adam(W) with fp32 master weights and moments by default (``precision.main_params_dtype``
/ ``exp_avg_dtype`` / ``exp_avg_sq_dtype`` narrow them through megatron's precision-aware
optimizer; see :mod:`r1mega.models.precision`). With DP > 1 and
``train.use_distributed_optimizer`` the optimizer state is sharded over data-parallel ranks
(ZeRO-1 style), which is what lets a 671B model's Adam state fit. Gradient clipping uses
the global norm over all ranks.
"""

from __future__ import annotations

from typing import Any

from r1mega.models.precision import check_optimizer_precision_supported, optimizer_precision_kwargs
from r1mega.models.specs import te_available
from r1mega.training.policy import Policy


def build_optimizer(policy: Policy, train_cfg: Any, precision: Any | None = None) -> Any:
    """megatron-core ``MegatronOptimizer`` over the policy's DDP-wrapped chunks."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    check_optimizer_precision_supported(precision, te_imports=te_available())
    config = OptimizerConfig(
        optimizer="adam",
        lr=train_cfg.lr,
        min_lr=train_cfg.min_lr,
        weight_decay=train_cfg.weight_decay,
        adam_beta1=train_cfg.adam_beta1,
        adam_beta2=train_cfg.adam_beta2,
        adam_eps=train_cfg.adam_eps,
        clip_grad=train_cfg.grad_clip,
        use_distributed_optimizer=train_cfg.use_distributed_optimizer,
        # bf16 flag, fp8 recipe, optimizer-state dtypes; params_dtype as the model's.
        **{**optimizer_precision_kwargs(precision), "params_dtype": policy.config.params_dtype},
    )
    return get_megatron_optimizer(config, policy.chunks)


def build_lr_scheduler(optimizer: Any, train_cfg: Any) -> Any:
    """Warmup then constant/linear/cosine decay to ``min_lr`` over ``train.steps``."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if train_cfg.lr_warmup_steps else train_cfg.lr,
        max_lr=train_cfg.lr,
        min_lr=train_cfg.min_lr,
        lr_warmup_steps=train_cfg.lr_warmup_steps,
        lr_decay_steps=max(train_cfg.steps, train_cfg.lr_warmup_steps + 1),
        lr_decay_style=train_cfg.lr_decay_style,
        start_wd=train_cfg.weight_decay,
        end_wd=train_cfg.weight_decay,
        wd_incr_steps=max(train_cfg.steps, 1),
        wd_incr_style="constant",
    )
