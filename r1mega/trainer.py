"""The training driver: layout, policy, optimizer and the step loop on every rank.

Today a step is the policy-update half of GRPO exercised on a language-modelling batch:
forward and backward through megatron-core's schedules on the configured training
layout, gradient finalisation across DP/TP/PP/EP, clipping and an optimizer step. The
rollout (generation in the generation layout), rewards and the GRPO loss plug into
:func:`train_step` as they land.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from parallel.layout import Layout, init_distributed, initialize_layout
from parallel.platform import manual_seed
from r1mega.logging_utils import print_rank0
from r1mega.training.batches import causal_lm_batch, data_parallel_microbatches
from r1mega.training.optim import build_lr_scheduler, build_optimizer
from r1mega.training.policy import Policy, build_policy
from r1mega.training.schedule import forward_backward, lm_loss


@dataclass
class StepResult:
    step: int
    loss: float
    grad_norm: float
    lr: float
    tokens: int
    seconds: float


def synthetic_lm_batch(step: int, batch_size: int, seq_length: int, vocab_size: int,
                       seed: int) -> dict[str, torch.Tensor]:
    """Deterministic learnable sequences: arithmetic progressions modulo the vocabulary.

    Each row starts at a random token with a random stride in {1, 2, 3}; a model that
    learns the rule drives the loss down, so the step line shows optimisation working.
    """
    gen = torch.Generator().manual_seed(seed * 100003 + step)
    start = torch.randint(0, vocab_size, (batch_size, 1), generator=gen)
    stride = torch.randint(1, 4, (batch_size, 1), generator=gen)
    tokens = (start + stride * torch.arange(seq_length + 1)) % vocab_size
    return causal_lm_batch(tokens)


def _global_loss(stats: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """(token-loss sum, token count) over the global batch, on every rank."""
    from megatron.core import parallel_state as ps

    totals = torch.zeros(2)
    for s in stats:
        totals += s["lm_loss"]
    if ps.is_pipeline_last_stage():
        dist.all_reduce(totals, group=ps.get_data_parallel_group())
    # Only last-stage ranks hold the loss; MAX brings it to every rank (others are 0).
    dist.all_reduce(totals, op=dist.ReduceOp.MAX)
    return totals


def train_step(step: int, cfg: Any, layout: Layout, policy: Policy, optimizer: Any,
               scheduler: Any) -> StepResult:
    """One optimizer step over ``train.global_batch_size`` sequences."""
    from megatron.core import parallel_state as ps

    start = time.perf_counter()
    batch = synthetic_lm_batch(step, cfg.train.global_batch_size, cfg.train.seq_length,
                               cfg.model.vocab_size, cfg.train.seed)
    microbatches = data_parallel_microbatches(
        batch, cfg.train.micro_batch_size, ps.get_data_parallel_rank(), layout.dp)
    policy.zero_grad()
    optimizer.zero_grad()
    stats = forward_backward(policy, microbatches, lm_loss)
    lr = optimizer.param_groups[0]["lr"]
    _, grad_norm, _ = optimizer.step()
    scheduler.step(increment=1)
    totals = _global_loss(stats)
    return StepResult(
        step=step, loss=(totals[0] / totals[1].clamp_min(1)).item(),
        grad_norm=float(grad_norm or 0.0), lr=lr,
        tokens=int(totals[1].item()), seconds=time.perf_counter() - start,
    )


def run_training(cfg: Any) -> list[StepResult]:
    """Entry point of every rank for `r1mega train`."""
    env = init_distributed(default_port=cfg.launch.master_port)
    layout = Layout.from_config(cfg.train_layout, env.world_size, name="train_layout")
    initialize_layout(layout)
    manual_seed(cfg.train.seed)
    print_rank0(f"[r1mega] {env.world_size} process(es) via {env.launcher}; "
                f"train layout {layout.describe()}; model {cfg.model.arch} "
                f"({cfg.model.num_layers} layers, hidden {cfg.model.hidden_size})")
    policy = build_policy(cfg.model, cfg.train_layout, cfg.precision, cfg.train.recompute,
                          use_distributed_optimizer=cfg.train.use_distributed_optimizer)
    optimizer = build_optimizer(policy, cfg.train, cfg.precision)
    scheduler = build_lr_scheduler(optimizer, cfg.train)
    n_params = torch.tensor(float(sum(p.numel() for c in policy.chunks for p in c.parameters())))
    dist.all_reduce(n_params)
    print_rank0(f"[r1mega] parameters on all ranks (incl. replicas): {int(n_params.item()):,}")
    print_rank0("[r1mega] rollout, rewards and the GRPO loss: not implemented yet; each step "
                "trains the policy on a language-modelling batch through the same schedules")
    results = []
    for step in range(1, cfg.train.steps + 1):
        result = train_step(step, cfg, layout, policy, optimizer, scheduler)
        results.append(result)
        if step % cfg.logging.log_interval == 0 or step == cfg.train.steps:
            print_rank0(
                f"step {step}/{cfg.train.steps} | lm_loss {result.loss:.4f} | "
                f"grad_norm {result.grad_norm:.3f} | lr {result.lr:.2e} | "
                f"tokens/s {result.tokens / result.seconds:,.0f} | {result.seconds:.2f} s"
            )
    dist.barrier()
    return results
