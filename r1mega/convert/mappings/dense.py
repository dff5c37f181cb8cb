"""Llama and Qwen2 (GQA, SwiGLU, RMSNorm; Qwen2 with q/k/v biases).

megatron's fused ``linear_qkv`` holds, for each key/value group ``g``, the query heads
of that group followed by ``k_g`` and ``v_g`` ("per-query-group interleaved"), so a
TP split along the rows keeps whole groups together.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from r1mega.convert.mappings import TensorGroup, concat, copy


def qkv(prefix_hf: str, prefix_meg: str, suffix: str, heads: int, groups: int,
        head_dim: int) -> TensorGroup:
    """``q/k/v_proj.<suffix>`` <-> ``linear_qkv.<suffix>`` (weight or bias)."""
    per_group = heads // groups

    def to_megatron(ts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        q, k, v = ts
        rest = q.shape[1:]
        fused = torch.cat([q.reshape(groups, per_group * head_dim, *rest),
                           k.reshape(groups, head_dim, *rest),
                           v.reshape(groups, head_dim, *rest)], dim=1)
        return [fused.reshape(-1, *rest)]

    def to_hf(ts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        (fused,) = ts
        rest = fused.shape[1:]
        q, k, v = fused.reshape(groups, (per_group + 2) * head_dim, *rest).split(
            [per_group * head_dim, head_dim, head_dim], dim=1)
        return [t.reshape(-1, *rest).contiguous() for t in (q, k, v)]

    hf = tuple(f"{prefix_hf}{p}_proj.{suffix}" for p in "qkv")
    return TensorGroup(hf, (f"{prefix_meg}linear_qkv.{suffix}",), to_megatron, to_hf)


def groups(cfg: Any) -> list[TensorGroup]:
    heads = cfg.num_attention_heads
    kv_groups = cfg.num_query_groups or heads
    head_dim = cfg.kv_channels or cfg.hidden_size // heads
    out = [copy("model.embed_tokens.weight", "embedding.word_embeddings.weight")]
    for i in range(cfg.num_layers):
        hf, meg = f"model.layers.{i}.", f"decoder.layers.{i}."
        out.append(copy(f"{hf}input_layernorm.weight", f"{meg}input_layernorm.weight"))
        out.append(qkv(f"{hf}self_attn.", f"{meg}self_attention.", "weight", heads, kv_groups,
                       head_dim))
        if cfg.qkv_bias:
            out.append(qkv(f"{hf}self_attn.", f"{meg}self_attention.", "bias", heads,
                           kv_groups, head_dim))
        out.append(copy(f"{hf}self_attn.o_proj.weight", f"{meg}self_attention.linear_proj.weight"))
        out.append(copy(f"{hf}post_attention_layernorm.weight", f"{meg}pre_mlp_layernorm.weight"))
        out.append(concat([f"{hf}mlp.gate_proj.weight", f"{hf}mlp.up_proj.weight"],
                          f"{meg}mlp.linear_fc1.weight"))
        out.append(copy(f"{hf}mlp.down_proj.weight", f"{meg}mlp.linear_fc2.weight"))
    if getattr(cfg, "head", "lm") == "scalar":  # a reward model (r1mega.models.reward_model)
        out.append(copy("model.norm.weight", "head.norm.weight"))
        out.append(copy("score.weight", "head.score.weight"))
        return out
    out.append(copy("model.norm.weight", "decoder.final_layernorm.weight"))
    if not cfg.tie_embeddings:
        out.append(copy("lm_head.weight", "output_layer.weight"))
    return out
