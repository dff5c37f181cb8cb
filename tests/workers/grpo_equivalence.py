"""Worker for tests/test_grpo_step.py: two full GRPO steps at one layout.

Step = reference logprobs (host-swapped frozen weights) + vocab-parallel logprobs +
clipped GRPO loss with KL + backward + megatron optimizer step. ``reference`` (world size
1) saves the initial and the final weights; any other layout loads the initial weights,
runs the same two steps and compares its final weights with the reference's, resharded
to its own layout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from r1mega.checkpointing.model_io import load_model, save_model
from r1mega.config.schema import GRPOConfig, TrainConfig
from r1mega.training.grpo_step import RolloutBatch, grpo_step
from r1mega.training.optim import build_lr_scheduler, build_optimizer
from r1mega.training.policy import build_policy
from r1mega.training.reference import ReferencePolicy
from tests.workers.common import max_rel_diff_to_checkpoint, setup_layout

GROUPS, G, SEQ = 2, 4, 16


def rollout_batch(vocab: int, step: int) -> RolloutBatch:
    gen = torch.Generator().manual_seed(100 + step)
    b = GROUPS * G
    tokens = torch.randint(0, vocab, (b, SEQ + 1), generator=gen)
    mask = torch.zeros(b, SEQ)
    for i in range(b):
        prompt_len = 4 + i % 3
        end = SEQ - (i % 4)  # responses of different lengths, then padding
        mask[i, prompt_len - 1:end] = 1.0
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0, 0.25])
    return RolloutBatch(tokens=tokens, response_mask=mask, rewards=rewards)


def main(model_name: str, tp: int, pp: int, ep: int, workdir: str,
         variant: str = "padded") -> None:
    """``variant``: ``padded`` | ``packed`` (THD-packed microbatches; same results as
    padded) | ``kl_reward`` (KL to the reference subtracted from the rewards)."""
    env, model_cfg, layout_cfg, layout = setup_layout(model_name, tp, pp, ep)
    train_cfg = OmegaConf.structured(TrainConfig(
        lr=1e-4, adam_eps=1e-6, micro_batch_size=2, grad_clip=1.0,
        use_distributed_optimizer=True, steps=2))
    grpo_cfg = OmegaConf.structured(GRPOConfig(group_size=G, clip_low=0.2, clip_high=0.28,
                                               kl_coef=0.05, kl_estimator="k3",
                                               kl_in_reward=variant == "kl_reward"))
    policy = build_policy(model_cfg, layout_cfg, use_distributed_optimizer=True)
    work = Path(workdir)
    is_reference = env.world_size == 1
    if is_reference:
        # Zero-initialised biases would make Adam's first update lr * g / (|g| + eps) the
        # whole weight, turning fp32 reduction-order noise into large relative errors;
        # give them pretrained-like magnitudes instead.
        with torch.no_grad():
            gen = torch.Generator().manual_seed(5)
            for p in policy.chunks[0].module.parameters():
                if not p.any():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        save_model(policy.chunks, str(work / "initial"))
    else:
        load_model(policy.chunks, str(work / "initial"))
    optimizer = build_optimizer(policy, train_cfg)
    scheduler = build_lr_scheduler(optimizer, train_cfg)
    reference = ReferencePolicy(policy)
    history = []
    for step in (1, 2):
        metrics = grpo_step(policy, reference, optimizer, scheduler,
                            rollout_batch(model_cfg.vocab_size, step), grpo_cfg, train_cfg,
                            dp_size=layout.dp, pack=variant == "packed")
        history.append(metrics)

    if is_reference:
        save_model(policy.chunks, str(work / "final"))
        (work / "reference.json").write_text(json.dumps(history))
    else:
        mine = {n: p.detach().clone()
                for n, p in policy.chunks[0].module.named_parameters()}
        worst, worst_name = max_rel_diff_to_checkpoint(policy, str(work / "final"), mine)
        if env.rank == 0:
            (work / "result.json").write_text(json.dumps(
                {"history": history, "max_rel_weight_diff": worst,
                 "worst_param": worst_name, "layout": layout.describe()}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5],
         *sys.argv[6:])
