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


def build_lr_scheduler(optimizer: Any, train_cfg: Any, total_updates: int | None = None) -> Any:
    """Warm-up then constant/linear/cosine decay to ``min_lr``, counted in optimizer
    updates (``total_updates`` over the whole run, default ``train.steps``: an RL step
    makes :func:`updates_per_step` of them, an SFT step one).

    Used through :func:`optimizer_update`, which advances the schedule *before* each
    update, so update ``k`` (1-based) runs at ``lr * k / W`` during a warm-up of
    ``W = train.lr_warmup_steps`` updates (the first is not spent at LR 0) and the decay
    reaches ``min_lr`` one update after the last (none is spent at ``min_lr = 0``
    either). A resumed run keeps the schedule saved in its checkpoint.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    warmup = train_cfg.lr_warmup_steps
    if total_updates is None:
        total_updates = train_cfg.steps
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else train_cfg.lr,
        max_lr=train_cfg.lr,
        min_lr=train_cfg.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(total_updates, warmup) + 1,
        lr_decay_style=train_cfg.lr_decay_style,
        start_wd=train_cfg.weight_decay,
        end_wd=train_cfg.weight_decay,
        wd_incr_steps=max(total_updates, 1),
        wd_incr_style="constant",
    )


def updates_per_step(grpo_cfg: Any) -> int:
    """Optimizer updates in one RL step: every minibatch of every epoch."""
    return int(grpo_cfg.minibatches) * int(grpo_cfg.epochs_per_step)


def optimizer_update(optimizer: Any, scheduler: Any) -> tuple[float, float]:
    """One optimizer update on the finalized gradients: advance the LR schedule to this
    update, clip and step; returns ``(lr used, global grad norm before clipping)``."""
    scheduler.step(increment=1)
    lr = float(optimizer.param_groups[0]["lr"])
    _, grad_norm, _ = optimizer.step()
    return lr, float(grad_norm or 0.0)


def skip_update(scheduler: Any) -> float:
    """Spend an update's slot of the schedule without stepping the optimizer (an update
    with nothing to learn from); returns the LR it would have used."""
    scheduler.step(increment=1)
    return float(scheduler.optimizer.param_groups[0]["lr"])
