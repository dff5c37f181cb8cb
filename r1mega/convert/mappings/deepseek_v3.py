"""DeepSeek-V3: multi-head latent attention, dense first layers, routed + shared experts
with a sigmoid router and expert bias, and multi-token-prediction (MTP) layers.

HF names the MTP layers ``model.layers.{L+k}`` (after the ``L`` decoder layers); each
holds a full decoder layer plus ``enorm``/``hnorm``/``eh_proj``, its own final norm
(``shared_head.norm``) and copies of the embedding (``embed_tokens``) and output head
(``shared_head.head``), which megatron's MTP block shares with the main model.

The MLA projections map one to one: megatron splits ``linear_q_up_proj`` /
``linear_kv_up_proj`` outputs per head into [no-position, rotary] / [key, value] parts
and ``linear_kv_down_proj`` into [latent, rotary key] exactly as HF does, and its
``rotary_interleaved=False`` rotation equals HF's ``rope_interleave=True`` (measured
on the tiny model, see tests/test_convert.py).
"""

from __future__ import annotations

from typing import Any

from r1mega.convert.mappings import TensorGroup, concat, copy


def _mlp(hf: str, meg: str) -> list[TensorGroup]:
    return [concat([f"{hf}gate_proj.weight", f"{hf}up_proj.weight"], f"{meg}linear_fc1.weight"),
            copy(f"{hf}down_proj.weight", f"{meg}linear_fc2.weight")]


def _layer(cfg: Any, hf: str, meg: str, moe: bool) -> list[TensorGroup]:
    att_hf, att = f"{hf}self_attn.", f"{meg}self_attention."
    out = [copy(f"{hf}input_layernorm.weight", f"{meg}input_layernorm.weight"),
           copy(f"{att_hf}q_a_proj.weight", f"{att}linear_q_down_proj.weight"),
           copy(f"{att_hf}q_a_layernorm.weight", f"{att}q_layernorm.weight"),
           copy(f"{att_hf}q_b_proj.weight", f"{att}linear_q_up_proj.weight"),
           copy(f"{att_hf}kv_a_proj_with_mqa.weight", f"{att}linear_kv_down_proj.weight"),
           copy(f"{att_hf}kv_a_layernorm.weight", f"{att}kv_layernorm.weight"),
           copy(f"{att_hf}kv_b_proj.weight", f"{att}linear_kv_up_proj.weight"),
           copy(f"{att_hf}o_proj.weight", f"{att}linear_proj.weight"),
           copy(f"{hf}post_attention_layernorm.weight", f"{meg}pre_mlp_layernorm.weight")]
    if not moe:
        return out + _mlp(f"{hf}mlp.", f"{meg}mlp.")
    out += [copy(f"{hf}mlp.gate.weight", f"{meg}mlp.router.weight"),
            copy(f"{hf}mlp.gate.e_score_correction_bias", f"{meg}mlp.router.expert_bias")]
    for e in range(cfg.num_experts):
        out += _mlp(f"{hf}mlp.experts.{e}.", f"{meg}mlp.experts.local_experts.{e}.")
    if cfg.moe_shared_expert_intermediate_size:
        out += _mlp(f"{hf}mlp.shared_experts.", f"{meg}mlp.shared_experts.")
    return out


def groups(cfg: Any) -> list[TensorGroup]:
    out = [copy("model.embed_tokens.weight", "embedding.word_embeddings.weight")]
    for i in range(cfg.num_layers):
        moe = cfg.num_experts is not None and i >= cfg.first_k_dense_layers
        out += _layer(cfg, f"model.layers.{i}.", f"decoder.layers.{i}.", moe)
    out.append(copy("model.norm.weight", "decoder.final_layernorm.weight"))
    out.append(copy("lm_head.weight", "output_layer.weight"))
    for k in range(cfg.mtp_num_layers):
        hf, meg = f"model.layers.{cfg.num_layers + k}.", f"mtp.layers.{k}."
        out += [TensorGroup((f"{hf}embed_tokens.weight",),
                            ("embedding.word_embeddings.weight",), alias=True),
                copy(f"{hf}enorm.weight", f"{meg}enorm.weight"),
                copy(f"{hf}hnorm.weight", f"{meg}hnorm.weight"),
                copy(f"{hf}eh_proj.weight", f"{meg}eh_proj.weight")]
        out += _layer(cfg, hf, f"{meg}mtp_model_layer.", cfg.num_experts is not None)
        out += [copy(f"{hf}shared_head.norm.weight", f"{meg}final_layernorm.weight"),
                TensorGroup((f"{hf}shared_head.head.weight",), ("output_layer.weight",),
                            alias=True)]
    return out
