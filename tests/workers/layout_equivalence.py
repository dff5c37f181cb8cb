"""Worker for tests/test_layouts.py: loss and gradients of one layout.

``reference`` (world size 1) initialises the model, saves its weights, runs one
forward/backward on a fixed global batch and saves the gradients as a distributed
checkpoint (the gradient of each parameter stored in place of its weight). Any other
layout loads those weights, runs the same global batch split over microbatches and DP
ranks, loads the reference gradients into its own sharding and compares them with its
own, writing the worst relative difference to ``result.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from r1mega.checkpointing.model_io import load_model, save_model
from r1mega.training.batches import causal_lm_batch, data_parallel_microbatches
from r1mega.training.policy import build_policy
from r1mega.training.schedule import forward_backward, lm_loss
from tests.workers.common import max_rel_diff_to_checkpoint, setup_layout

GLOBAL_BATCH, SEQ, MICRO = 4, 16, 1


def main(model_name: str, tp: int, pp: int, ep: int, workdir: str) -> None:
    env, model_cfg, layout_cfg, layout = setup_layout(model_name, tp, pp, ep)
    policy = build_policy(model_cfg, layout_cfg)
    work = Path(workdir)
    reference = env.world_size == 1
    if reference:
        save_model(policy.chunks, str(work / "weights"))
    else:
        load_model(policy.chunks, str(work / "weights"))

    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, model_cfg.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=generator)
    from megatron.core import parallel_state as ps

    microbatches = data_parallel_microbatches(
        causal_lm_batch(tokens), MICRO, ps.get_data_parallel_rank(), layout.dp)
    policy.zero_grad()
    stats = forward_backward(policy, microbatches, lm_loss)
    # Global mean loss: sum of token losses over every DP rank / all tokens.
    totals = torch.zeros(2)
    for s in stats:
        totals += s["lm_loss"]
    if ps.is_pipeline_last_stage():
        dist.all_reduce(totals, group=ps.get_data_parallel_group())
    dist.all_reduce(totals, op=dist.ReduceOp.MAX)  # last stage's value to every rank
    loss = (totals[0] / totals[1]).item()

    params = {name: p for name, p in policy.chunks[0].module.named_parameters()}
    grads = {name: p.main_grad.detach().clone().float() for name, p in params.items()}
    if reference:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(grads[name])
        save_model(policy.chunks, str(work / "grads"))
        (work / "reference.json").write_text(json.dumps({"loss": loss}))
    else:
        worst, worst_name = max_rel_diff_to_checkpoint(policy, str(work / "grads"), grads)
        if env.rank == 0:
            (work / "result.json").write_text(json.dumps(
                {"loss": loss, "max_rel_grad_diff": worst, "worst_param": worst_name,
                 "num_params": len(params), "layout": layout.describe()}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
