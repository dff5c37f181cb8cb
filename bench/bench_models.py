"""Model shapes the single-device benchmarks share (``model`` config sections).

``toy``: seconds on a CPU, for the tests. ``gpu``: what one 80 GB H100 trains with fp32
Adam state (no distributed optimizer): a ~1.2B dense model and a DeepSeek-V3-shaped MoE.
"""

from __future__ import annotations

TOY_DENSE = {"arch": "llama", "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 256,
             "num_attention_heads": 4, "num_query_groups": 2, "vocab_size": 256,
             "max_position_embeddings": 256, "transformer_impl": "auto"}
TOY_MOE = {"arch": "deepseek_v3", "num_layers": 2, "first_k_dense_layers": 1,
           "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4,
           "q_lora_rank": 32, "kv_lora_rank": 16, "qk_head_dim": 16,
           "qk_pos_emb_head_dim": 8, "v_head_dim": 16, "num_experts": 4,
           "moe_ffn_hidden_size": 32, "moe_topk": 2, "moe_shared_expert_intermediate_size": 32,
           "moe_router_topk_scaling_factor": 2.5, "mtp_num_layers": 1, "vocab_size": 256,
           "max_position_embeddings": 256, "transformer_impl": "auto"}
# ~1.2B dense: the Llama-3.2-1B shape (GQA 32/8 heads, tied 128K vocabulary).
GPU_DENSE = {"arch": "llama", "num_layers": 16, "hidden_size": 2048, "ffn_hidden_size": 8192,
             "num_attention_heads": 32, "num_query_groups": 8, "kv_channels": 64,
             "vocab_size": 128256, "tie_embeddings": True, "rope_theta": 500000.0,
             "max_position_embeddings": 8192, "transformer_impl": "auto"}
# DeepSeek-V3's shape scaled to one GPU: MLA with V3's head dims, 1 dense + 7 MoE layers
# of 64 experts (top-6, group-limited 8 groups / top-4) + 1 shared, sigmoid routing with
# expert bias, one MTP layer. ~1.9B parameters, ~0.4B activated per token.
GPU_MOE = {"arch": "deepseek_v3", "num_layers": 8, "first_k_dense_layers": 1,
           "hidden_size": 2048, "ffn_hidden_size": 5632, "num_attention_heads": 16,
           "q_lora_rank": 768, "kv_lora_rank": 512, "qk_head_dim": 128,
           "qk_pos_emb_head_dim": 64, "v_head_dim": 128, "num_experts": 64,
           "moe_ffn_hidden_size": 512, "moe_topk": 6, "moe_shared_expert_intermediate_size": 512,
           "moe_router_num_groups": 8, "moe_router_group_topk": 4,
           "moe_router_topk_scaling_factor": 2.5, "mtp_num_layers": 1, "vocab_size": 32768,
           "max_position_embeddings": 8192, "transformer_impl": "auto"}
