"""Hugging Face ``config.json`` <-> r1mega :class:`~r1mega.config.schema.ModelConfig`.

The converter reads ``config.json`` as a plain dict (``transformers`` is a test-only
dependency). Every HF option the megatron model cannot reproduce is refused by name
instead of being dropped silently: a converted checkpoint must compute what the
original computes. Both the transformers-5 layout (``rope_parameters``) and the older
one (``rope_theta`` + ``rope_scaling``, as in DeepSeek-V3's released ``config.json``)
are understood.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from r1mega.config.schema import ModelConfig
from r1mega.convert.errors import ConversionError

# HF class name -> ModelConfig.arch
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    # Reward models: one-label sequence classifiers (ModelConfig.head = scalar).
    "LlamaForSequenceClassification": "llama",
    "Qwen2ForSequenceClassification": "qwen2",
}
_HF_CLASS = {arch: cls for cls, arch in SUPPORTED_ARCHITECTURES.items()
             if cls.endswith("ForCausalLM")}
_HF_REWARD_CLASS = {arch: cls for cls, arch in SUPPORTED_ARCHITECTURES.items()
                    if cls.endswith("ForSequenceClassification")}
_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "deepseek_v3": "deepseek_v3"}


def hf_architecture(config: Mapping[str, Any]) -> str:
    """The ModelConfig ``arch`` of an HF config; refuses anything else by its
    ``architectures`` field."""
    archs = list(config.get("architectures") or [])
    if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(
            f"unsupported architecture: config.json has architectures={archs!r}; the "
            f"converter supports {sorted(SUPPORTED_ARCHITECTURES)}"
        )
    return SUPPORTED_ARCHITECTURES[archs[0]]


def _rope(config: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling parameters or None for plain RoPE) in either HF layout."""
    params = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling")
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    if scaling is None:
        rope_type = params.get("rope_type", params.get("type", "default"))
        scaling = params if rope_type not in (None, "default") else None
    if scaling is not None:
        scaling = dict(scaling)
        scaling["rope_type"] = scaling.get("rope_type", scaling.get("type"))
        if scaling["rope_type"] in (None, "default"):
            scaling = None
    return float(theta), scaling


def _refuse(config: Mapping[str, Any], key: str, allowed: Any, why: str) -> None:
    value = config.get(key, allowed)
    if value != allowed:
        raise ConversionError(f"config.json {key}={value!r} is not supported: {why}")


def _common(config: Mapping[str, Any], arch: str) -> dict[str, Any]:
    _refuse(config, "hidden_act", "silu", "the megatron models use SwiGLU (silu)")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    return dict(
        arch=arch,
        num_layers=config["num_hidden_layers"],
        hidden_size=hidden,
        ffn_hidden_size=config["intermediate_size"],
        num_attention_heads=heads,
        vocab_size=config["vocab_size"],
        max_position_embeddings=config.get("max_position_embeddings", 4096),
        norm_epsilon=config.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        init_method_std=config.get("initializer_range", 0.02),
    )


def _dense(config: Mapping[str, Any], arch: str) -> ModelConfig:
    fields = _common(config, arch)
    theta, scaling = _rope(config)
    if scaling is not None:
        raise ConversionError(
            f"config.json rope scaling {scaling['rope_type']!r} is not supported for {arch} "
            "(the model provider implements plain RoPE for dense models)"
        )
    heads = fields["num_attention_heads"]
    head_dim = config.get("head_dim") or fields["hidden_size"] // heads
    if arch == "llama":
        _refuse(config, "attention_bias", False, "Llama attention biases (incl. o_proj)")
        _refuse(config, "mlp_bias", False, "MLP biases")
    else:
        _refuse(config, "use_sliding_window", False, "sliding-window attention")
    return ModelConfig(
        **fields,
        num_query_groups=config.get("num_key_value_heads", heads),
        kv_channels=head_dim if head_dim * heads != fields["hidden_size"] else None,
        rope_theta=theta,
        qkv_bias=arch == "qwen2",
    )


def _deepseek_v3(config: Mapping[str, Any], include_mtp: bool) -> ModelConfig:
    fields = _common(config, "deepseek_v3")
    theta, scaling = _rope(config)
    _refuse(config, "rope_interleave", True,
            "the megatron MLA is built with rotary_interleaved=False, which matches HF's "
            "rope_interleave=True")
    _refuse(config, "attention_bias", False, "attention biases")
    _refuse(config, "scoring_func", "sigmoid", "only sigmoid router scores")
    _refuse(config, "topk_method", "noaux_tc", "only noaux_tc (expert-bias) routing")
    _refuse(config, "norm_topk_prob", True,
            "megatron's sigmoid router always renormalises the top-k scores")
    _refuse(config, "moe_layer_freq", 1, "MoE in every layer after first_k_dense_replace")
    _refuse(config, "num_key_value_heads", fields["num_attention_heads"], "MLA has no GQA")
    if config.get("q_lora_rank") is None:
        raise ConversionError(
            "config.json q_lora_rank=None (no query compression) is not supported: the model "
            "provider builds MLA with qk_layernorm=True, which megatron-core 0.19.2 turns into "
            "a normalised q projection (fused norm+linear, TE only) that HF does not have")
    rope: dict[str, Any] = dict(rope_type="rope", rope_theta=theta)
    if scaling is not None:
        if scaling["rope_type"] != "yarn":
            raise ConversionError(
                f"config.json rope scaling {scaling['rope_type']!r} is not supported for "
                "deepseek_v3 (yarn or none)"
            )
        rope.update(
            rope_type="yarn",
            rope_scaling_factor=float(scaling["factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
            beta_fast=float(scaling.get("beta_fast", 32.0)),
            beta_slow=float(scaling.get("beta_slow", 1.0)),
            mscale=float(scaling.get("mscale", 1.0)),
            mscale_all_dim=float(scaling.get("mscale_all_dim", 0.0)),
        )
    n_group = config.get("n_group") or 1
    topk, topk_group = config["num_experts_per_tok"], config.get("topk_group") or 1
    if n_group > 1 and topk // topk_group != 2:
        raise ConversionError(
            f"config.json num_experts_per_tok={topk}, topk_group={topk_group} is not "
            "supported: HF scores a group by its top-2 experts, megatron by its top "
            "num_experts_per_tok // topk_group; they agree only when that is 2")
    n_shared = config.get("n_shared_experts") or 0
    moe_ffn = config["moe_intermediate_size"]
    return ModelConfig(
        **fields,
        **rope,
        q_lora_rank=config["q_lora_rank"],
        kv_lora_rank=config["kv_lora_rank"],
        qk_head_dim=config["qk_nope_head_dim"],
        qk_pos_emb_head_dim=config["qk_rope_head_dim"],
        v_head_dim=config["v_head_dim"],
        num_experts=config["n_routed_experts"],
        moe_ffn_hidden_size=moe_ffn,
        moe_topk=topk,
        moe_shared_expert_intermediate_size=n_shared * moe_ffn if n_shared else None,
        first_k_dense_layers=config.get("first_k_dense_replace", 0),
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=float(config.get("routed_scaling_factor", 1.0)),
        moe_router_num_groups=n_group if n_group > 1 else None,
        moe_router_group_topk=topk_group if n_group > 1 else None,
        mtp_num_layers=int(config.get("num_nextn_predict_layers") or 0) if include_mtp else 0,
    )


def model_config_from_hf(config: Mapping[str, Any], include_mtp: bool = True) -> ModelConfig:
    """The r1mega ModelConfig that computes what the HF model of ``config`` computes.

    ``include_mtp=False`` drops DeepSeek-V3's multi-token-prediction layers. A field the
    architecture needs that is missing or of the wrong type is a ConversionError.
    """
    try:
        return _model_config_from_hf(config, include_mtp)
    except ConversionError:
        raise
    except KeyError as e:
        raise ConversionError(f"config.json lacks {e.args[0]!r}") from None
    except (TypeError, ValueError, IndexError, AttributeError) as e:
        raise ConversionError(f"config.json has a malformed field ({type(e).__name__}: "
                              f"{e})") from None


def _model_config_from_hf(config: Mapping[str, Any], include_mtp: bool) -> ModelConfig:
    arch = hf_architecture(config)
    if arch == "deepseek_v3":
        return _deepseek_v3(config, include_mtp)
    model_cfg = _dense(config, arch)
    if config["architectures"][0].endswith("ForSequenceClassification"):
        labels = len(config.get("id2label") or {}) or config.get("num_labels", 1)
        if labels != 1:
            raise ConversionError(
                f"config.json has {labels} labels: a reward model scores with one label "
                "(num_labels=1)")
        model_cfg.head = "scalar"
    return model_cfg


def hf_config_from_model_config(model_cfg: Any, dtype: str) -> dict[str, Any]:
    """A ``config.json`` for ``model_cfg`` when the original HF config is not at hand
    (e.g. a checkpoint trained from an r1mega YAML config). Legacy rope fields are used:
    transformers 4 and 5 both read them."""
    cfg = model_cfg
    heads = cfg.num_attention_heads
    scalar = getattr(cfg, "head", "lm") == "scalar"
    out: dict[str, Any] = {
        "architectures": [(_HF_REWARD_CLASS if scalar else _HF_CLASS)[cfg.arch]],
        "model_type": _MODEL_TYPE[cfg.arch],
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": heads,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_epsilon,
        "initializer_range": cfg.init_method_std,
        "tie_word_embeddings": bool(cfg.tie_embeddings),
        "rope_theta": cfg.rope_theta,
        "attention_bias": False,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if scalar:
        out["num_labels"] = 1
    if cfg.arch in ("llama", "qwen2"):
        out["num_key_value_heads"] = cfg.num_query_groups or heads
        out["head_dim"] = cfg.kv_channels or cfg.hidden_size // heads
        if cfg.arch == "llama":
            out["mlp_bias"] = False
        else:
            out["use_sliding_window"] = False
        return out
    out.update(
        num_key_value_heads=heads,
        q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_head_dim,
        qk_rope_head_dim=cfg.qk_pos_emb_head_dim,
        v_head_dim=cfg.v_head_dim,
        rope_interleave=True,
        n_routed_experts=cfg.num_experts,
        moe_intermediate_size=cfg.moe_ffn_hidden_size,
        num_experts_per_tok=cfg.moe_topk,
        n_shared_experts=(cfg.moe_shared_expert_intermediate_size or 0)
        // cfg.moe_ffn_hidden_size,
        first_k_dense_replace=cfg.first_k_dense_layers,
        routed_scaling_factor=cfg.moe_router_topk_scaling_factor or 1.0,
        n_group=cfg.moe_router_num_groups or 1,
        topk_group=cfg.moe_router_group_topk or 1,
        norm_topk_prob=True,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        num_nextn_predict_layers=cfg.mtp_num_layers,
    )
    if cfg.rope_type == "yarn":
        out["rope_scaling"] = {
            "type": "yarn", "rope_type": "yarn", "factor": cfg.rope_scaling_factor,
            "original_max_position_embeddings": cfg.original_max_position_embeddings,
            "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow, "mscale": cfg.mscale,
            "mscale_all_dim": cfg.mscale_all_dim,
        }
    return out
