"""Shared set-up of the multi-process test workers: tiny models, layouts, comparison."""

from __future__ import annotations

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from parallel.layout import DistributedEnv, Layout, init_distributed, initialize_layout
from parallel.platform import manual_seed
from r1mega.checkpointing.model_io import load_model
from r1mega.config.schema import LayoutConfig, ModelConfig
from r1mega.training.policy import Policy

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


def setup_layout(model_name: str, tp: int, pp: int, ep: int
                 ) -> tuple[DistributedEnv, ModelConfig, LayoutConfig, Layout]:
    """Join the job, build the layout's process groups and seed; MoE with TP gets SP."""
    env = init_distributed()
    model_cfg = OmegaConf.structured(ModelConfig(**TINY_MODELS[model_name],
                                                 transformer_impl="local"))
    is_moe = model_cfg.num_experts is not None
    layout_cfg = OmegaConf.structured(LayoutConfig(tp=tp, pp=pp, ep=ep,
                                                   sequence_parallel=tp > 1 and is_moe))
    layout = Layout.from_config(layout_cfg, env.world_size)
    initialize_layout(layout)
    manual_seed(1234)
    return env, model_cfg, layout_cfg, layout


def max_rel_diff_to_checkpoint(policy: Policy, directory: str,
                               tensors: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Load a checkpoint (saved at any layout) into ``policy`` and compare it with
    ``tensors`` (this rank's values by parameter name): the worst over all ranks of
    max |t - ref| / max |ref| per tensor, and (on this rank) the worst tensor's name."""
    params = dict(policy.chunks[0].module.named_parameters())
    load_model(policy.chunks, directory)
    worst, worst_name = 0.0, ""
    for name, p in params.items():
        ref = p.detach().float()
        rel = ((tensors[name].float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        if rel.item() > worst:
            worst, worst_name = rel.item(), name
    worst_t = torch.tensor([worst])
    dist.all_reduce(worst_t, op=dist.ReduceOp.MAX)
    return worst_t.item(), worst_name
