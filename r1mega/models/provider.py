"""Build megatron-core ``GPTModel``s from an r1mega :class:`ModelConfig`.

One provider serves both families:

* dense Llama/Qwen2-style bases: GQA, SwiGLU, RMSNorm, RoPE, optional q/k/v bias, tied or
  untied embeddings;
* DeepSeek-V3: multi-head latent attention, the first ``first_k_dense_layers`` dense and
  the rest MoE with routed + shared experts, sigmoid routing with an expert-bias
  (aux-loss-free balancing), top-k scaling, node-limited group routing, YaRN, MTP.

The layout (TP/PP/EP/...) is whatever megatron-core's ``parallel_state`` was initialised
with (see :mod:`parallel.layout`); the provider builds this rank's pipeline stage.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from parallel.platform import gpu_available
from r1mega.models.fp8_support import check_fp8_supported
from r1mega.models.precision import generation_precision, transformer_precision_kwargs
from r1mega.models.specs import decoder_block_spec, mtp_block_spec, use_transformer_engine


def _moe_layer_pattern(model_cfg: Any) -> list[int] | int:
    """megatron-core's ``moe_layer_freq``: 0 for the first-k dense layers, 1 after."""
    if model_cfg.num_experts is None:
        return 1
    k = model_cfg.first_k_dense_layers
    return [0] * k + [1] * (model_cfg.num_layers - k)


def build_transformer_config(model_cfg: Any, layout: Any, precision: Any | None = None,
                             recompute: str | None = None) -> Any:
    """Translate the project's model + layout + precision config into a megatron config.

    Returns an ``MLATransformerConfig`` for DeepSeek-V3 and a ``TransformerConfig``
    otherwise. Dropout is off: RL fine-tuning of LLMs runs without it, and exact
    cross-layout equivalence needs determinism.
    """
    from megatron.core.transformer.transformer_config import (
        MLATransformerConfig,
        TransformerConfig,
    )

    # FP8 refusals (no TE, no FP8 GPU, TE too old for the recipe) name the config keys here,
    # before any weight is allocated.
    check_fp8_supported(precision, model_cfg.transformer_impl)
    on_gpu = gpu_available()
    common: dict[str, Any] = dict(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        layernorm_epsilon=model_cfg.norm_epsilon,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model_cfg.init_method_std,
        # Weight/activation dtype and the FP8 recipe (r1mega.models.precision).
        **transformer_precision_kwargs(precision),
        # Parallel layout.
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        context_parallel_size=layout.cp,
        sequence_parallel=layout.sequence_parallel,
        # The layer implementation the specs are built from (megatron resolves defaults,
        # e.g. MLA's q/kv norm modules, from it): TE when it imports, else local.
        transformer_impl=("transformer_engine"
                          if use_transformer_engine(model_cfg.transformer_impl) else "local"),
        # Fusions that need CUDA kernels are only requested on GPU.
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=False,
        masked_softmax_fusion=on_gpu,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        # Deterministic fp32 routing so layouts agree bit-for-bit on the routing decision.
        moe_router_dtype="fp32",
    )
    if layout.pp_layers is not None and layout.pp > 1:
        common["num_layers_in_first_pipeline_stage"] = layout.pp_layers[0]
        common["num_layers_in_last_pipeline_stage"] = layout.pp_layers[-1]
    if recompute == "full":
        common.update(recompute_granularity="full", recompute_method="uniform",
                      recompute_num_layers=1)
    elif recompute == "selective":
        common.update(recompute_granularity="selective")
    if model_cfg.num_experts is not None:
        common.update(
            num_moe_experts=model_cfg.num_experts,
            moe_ffn_hidden_size=model_cfg.moe_ffn_hidden_size,
            moe_router_topk=model_cfg.moe_topk,
            moe_shared_expert_intermediate_size=model_cfg.moe_shared_expert_intermediate_size,
            moe_layer_freq=_moe_layer_pattern(model_cfg),
            moe_router_score_function=model_cfg.moe_router_score_function,
            moe_router_enable_expert_bias=model_cfg.moe_router_enable_expert_bias,
            moe_router_bias_update_rate=model_cfg.moe_router_bias_update_rate,
            moe_router_topk_scaling_factor=model_cfg.moe_router_topk_scaling_factor,
            moe_router_num_groups=model_cfg.moe_router_num_groups,
            moe_router_group_topk=model_cfg.moe_router_group_topk,
            moe_router_pre_softmax=model_cfg.moe_router_score_function == "softmax",
            moe_router_load_balancing_type=(
                "seq_aux_loss" if model_cfg.moe_aux_loss_coeff > 0 else "none"
            ),
            moe_aux_loss_coeff=model_cfg.moe_aux_loss_coeff,
            # alltoall creates CUDA streams; allgather is exact and runs on CPU.
            moe_token_dispatcher_type="alltoall" if on_gpu else "allgather",
            moe_grouped_gemm=on_gpu,
            moe_permute_fusion=False,
        )
    if model_cfg.mtp_num_layers:
        common.update(
            mtp_num_layers=model_cfg.mtp_num_layers,
            mtp_loss_scaling_factor=model_cfg.mtp_loss_scaling_factor,
        )
    if model_cfg.arch == "deepseek_v3":
        return MLATransformerConfig(
            **common,
            q_lora_rank=model_cfg.q_lora_rank,
            kv_lora_rank=model_cfg.kv_lora_rank,
            qk_head_dim=model_cfg.qk_head_dim,
            qk_pos_emb_head_dim=model_cfg.qk_pos_emb_head_dim,
            v_head_dim=model_cfg.v_head_dim,
            qk_layernorm=True,  # the q_a / kv_a low-rank norms
            rope_type=model_cfg.rope_type,
            rotary_base=model_cfg.rope_theta,
            rotary_scaling_factor=model_cfg.rope_scaling_factor,
            original_max_position_embeddings=model_cfg.original_max_position_embeddings,
            beta_fast=model_cfg.beta_fast,
            beta_slow=model_cfg.beta_slow,
            mscale=model_cfg.mscale,
            mscale_all_dim=model_cfg.mscale_all_dim,
            rotary_interleaved=False,
        )
    return TransformerConfig(
        **common,
        num_query_groups=model_cfg.num_query_groups,
        kv_channels=model_cfg.kv_channels,
        add_qkv_bias=model_cfg.qkv_bias,
    )


def model_stage_flags() -> tuple[bool, bool]:
    """(pre_process, post_process) for this rank's pipeline stage."""
    from megatron.core import parallel_state

    return (
        parallel_state.is_pipeline_first_stage(ignore_virtual=True),
        parallel_state.is_pipeline_last_stage(ignore_virtual=True),
    )


def build_model(model_cfg: Any, layout: Any, precision: Any | None = None,
                recompute: str | None = None) -> torch.nn.Module:
    """Build this rank's stage of the policy as a megatron-core ``GPTModel``.

    ``parallel_state`` must already be initialised for ``layout``.
    """
    from megatron.core import parallel_state

    config = build_transformer_config(model_cfg, layout, precision, recompute)
    pre_process, post_process = model_stage_flags()
    return _gpt_model(model_cfg, config, parallel_state.get_pipeline_model_parallel_rank(),
                      pre_process, post_process, with_mtp=True)


def build_generation_model(model_cfg: Any, layout: Any, pg_collection: Any,
                           precision: Any | None = None, record_routing: bool = False,
                           cuda_graphs: bool = False) -> torch.nn.Module:
    """The policy in a generation layout, on process groups of its own.

    Same architecture and provider as :func:`build_model`, but in ``layout`` over
    ``pg_collection`` (see :func:`parallel.process_groups.process_groups_for_layout`)
    while ``parallel_state`` keeps the training layout. Weights are left uninitialised
    (resharding overwrites every one of them) and the multi-token-prediction head is not
    built: decoding uses only the main head.

    The model is configured for megatron's dynamic inference engine (the rollout engine):
    MLA caches latents (``cache_mla_latents``), MoE inference uses the NCCL all-gather
    token dispatcher type (the default NVLS type allocates NVLink symmetric memory under
    expert parallelism), with ``record_routing`` the routers record the experts they
    choose (``moe_enable_routing_replay``) for routing replay in training, and with
    ``cuda_graphs`` (GPU only) each layer's inference steps are captured in CUDA graphs.
    """
    if layout.pp != 1 or layout.cp != 1:
        raise ValueError(
            f"generation_layout.pp={layout.pp}, cp={layout.cp}: the rollout engine decodes "
            "without pipeline or context parallelism (use tp/ep for large models)"
        )
    from omegaconf import OmegaConf

    model_cfg = OmegaConf.merge(model_cfg, {"mtp_num_layers": 0})
    # Decoding runs bf16 GEMMs even when training runs FP8 ones (r1mega.models.precision).
    config = build_transformer_config(model_cfg, layout, generation_precision(precision))
    config.perform_initialization = False
    if model_cfg.arch == "deepseek_v3":
        config.cache_mla_latents = True
    if model_cfg.num_experts is not None:
        config.inference_moe_token_dispatcher_type = "nccl"
        config.moe_enable_routing_replay = record_routing
    if cuda_graphs:
        if not gpu_available():
            raise ValueError("rollout.cuda_graphs=true needs a CUDA GPU")
        from megatron.core.transformer.enums import InferenceCudaGraphScope

        config.cuda_graph_impl = "local"
        config.cuda_graph_modules = []
        config.inference_cuda_graph_scope = InferenceCudaGraphScope.layer
        # Expert parallelism under CUDA graphs pads experts to fixed shapes.
        config.moe_pad_experts_for_cuda_graph_inference = (model_cfg.num_experts is not None
                                                           and layout.ep > 1)
    model = _gpt_model(model_cfg, config, 0, True, True, with_mtp=False,
                       pg_collection=pg_collection)
    model.eval()
    return model


def _gpt_model(model_cfg: Any, config: Any, pp_rank: int, pre_process: bool,
               post_process: bool, with_mtp: bool, pg_collection: Any = None
               ) -> torch.nn.Module:
    from megatron.core.models.gpt import GPTModel

    use_te = config.transformer_impl == "transformer_engine"
    block_spec = decoder_block_spec(config, use_te, pp_rank=pp_rank)
    mla = model_cfg.arch == "deepseek_v3"
    kwargs: dict[str, Any] = dict(
        config=config,
        transformer_layer_spec=block_spec,
        vocab_size=model_cfg.vocab_size,
        max_sequence_length=model_cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=model_cfg.tie_embeddings,
        # MLA applies its own (YaRN) rotary embedding inside attention.
        position_embedding_type="none" if mla else "rope",
        rotary_base=int(model_cfg.rope_theta),
        mtp_block_spec=(mtp_block_spec(config, block_spec, use_te, pp_rank=pp_rank)
                        if with_mtp else None),
        pg_collection=pg_collection,
    )
    if model_cfg.head == "scalar":
        from r1mega.models.reward_model import RewardModel

        model = RewardModel(last_stage=post_process, **kwargs)
    else:
        model = GPTModel(**kwargs)
    if gpu_available():
        model.cuda(torch.cuda.current_device())
    return model
