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
from omegaconf import OmegaConf

from parallel.layout import Layout, init_distributed, initialize_layout
from parallel.platform import manual_seed
from r1mega.checkpointing.model_io import load_model, save_model
from r1mega.config.schema import LayoutConfig, ModelConfig
from r1mega.training.batches import causal_lm_batch, data_parallel_microbatches
from r1mega.training.policy import build_policy
from r1mega.training.schedule import forward_backward, lm_loss

TINY_MODELS = {
    "dense": dict(arch="qwen2", num_layers=4, hidden_size=64, ffn_hidden_size=128,
                  num_attention_heads=4, num_query_groups=2, vocab_size=256, qkv_bias=True,
                  max_position_embeddings=128, rope_theta=10000.0),
    # Llama-style: no q/k/v bias, embeddings tied to the output layer (across PP stages).
    "llama_tied": dict(arch="llama", num_layers=2, hidden_size=64, ffn_hidden_size=96,
                       num_attention_heads=4, num_query_groups=1, vocab_size=256,
                       tie_embeddings=True, max_position_embeddings=128, rope_theta=500000.0),
    "deepseek_v3": dict(arch="deepseek_v3", num_layers=4, hidden_size=64, ffn_hidden_size=128,
                        num_attention_heads=4, vocab_size=256, q_lora_rank=32, kv_lora_rank=16,
                        qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16, num_experts=4,
                        moe_ffn_hidden_size=32, moe_topk=2, moe_shared_expert_intermediate_size=32,
                        first_k_dense_layers=1, moe_router_topk_scaling_factor=2.5,
                        mtp_num_layers=1, max_position_embeddings=128),
}
GLOBAL_BATCH, SEQ, MICRO = 4, 16, 1


def main(model_name: str, tp: int, pp: int, ep: int, workdir: str) -> None:
    env = init_distributed()
    model_cfg = OmegaConf.structured(ModelConfig(**TINY_MODELS[model_name],
                                                 transformer_impl="local"))
    is_moe = model_cfg.num_experts is not None
    layout_cfg = OmegaConf.structured(LayoutConfig(tp=tp, pp=pp, ep=ep,
                                                   sequence_parallel=tp > 1 and is_moe))
    layout = Layout.from_config(layout_cfg, env.world_size)
    initialize_layout(layout)
    manual_seed(1234)
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
        load_model(policy.chunks, str(work / "grads"))
        worst, worst_name = 0.0, ""
        for name, p in params.items():
            ref = p.detach().float()
            rel = ((grads[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
            if rel > worst:
                worst, worst_name = rel, name
        worst_t = torch.tensor([worst])
        dist.all_reduce(worst_t, op=dist.ReduceOp.MAX)
        if env.rank == 0:
            (work / "result.json").write_text(json.dumps(
                {"loss": loss, "max_rel_grad_diff": worst_t.item(), "worst_param": worst_name,
                 "num_params": len(params), "layout": layout.describe()}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
