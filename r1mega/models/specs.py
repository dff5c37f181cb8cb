"""Layer-spec selection: Transformer Engine when it imports, megatron-core's local modules
otherwise.

TE is a GPU-cluster extra. A broken TE install raises ``OSError``/``RuntimeError`` (no
``libcuda.so``), not ``ImportError``, so the probe catches every exception.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from parallel.platform import SDPACoreAttention, SequenceParallelRMSNorm, duplicated_linear_class


@functools.lru_cache(maxsize=1)
def te_available() -> bool:
    """True when ``transformer_engine.pytorch`` imports and a GPU is present."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken TE raises OSError/RuntimeError
        return False
    return True


def use_transformer_engine(transformer_impl: str) -> bool:
    """Resolve ``model.transformer_impl`` (auto | transformer_engine | local)."""
    if transformer_impl == "local":
        return False
    if transformer_impl == "transformer_engine":
        if not te_available():
            raise RuntimeError(
                "model.transformer_impl=transformer_engine but Transformer Engine does not "
                "import on this machine (it needs an NVIDIA GPU and `pip install "
                "'r1mega[gpu]'`); use model.transformer_impl=auto or local"
            )
        return True
    if transformer_impl == "auto":
        return te_available()
    raise ValueError(
        f"model.transformer_impl={transformer_impl!r}: use auto, transformer_engine or local"
    )


def _replace_in_spec(spec: Any, old: type, new: type, _seen: set[int] | None = None) -> None:
    """Replace every reference to ``old`` by ``new`` in a (nested) megatron module spec."""
    seen = _seen if _seen is not None else set()
    if id(spec) in seen:
        return
    seen.add(id(spec))
    children: list[tuple[str, Any]]
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        children = [(f.name, getattr(spec, f.name)) for f in dataclasses.fields(spec)]
    else:
        return
    for name, value in children:
        if value is old:
            setattr(spec, name, new)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if item is old:
                    value[i] = new
                else:
                    _replace_in_spec(item, old, new, seen)
        else:
            _replace_in_spec(value, old, new, seen)


def _localize(spec: Any) -> None:
    """Make a local (non-TE) spec run on the CPU platform: SDPA attention, SP-aware norms."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    _replace_in_spec(spec, DotProductAttention, SDPACoreAttention)
    _replace_in_spec(spec, WrappedTorchNorm, SequenceParallelRMSNorm)
    _duplicate_mla_down_projections(spec)
    _save_mla_layers_under_te_keys(spec)


def _duplicate_mla_down_projections(spec: Any, _seen: set[int] | None = None) -> None:
    """Give MLA duplicated q/kv down projections, as TE's spec does (platform note 7)."""
    seen = _seen if _seen is not None else set()
    if id(spec) in seen or not dataclasses.is_dataclass(spec) or isinstance(spec, type):
        return
    seen.add(id(spec))
    for name in ("linear_q_down_proj", "linear_kv_down_proj"):
        if getattr(spec, name, None) is not None:
            setattr(spec, name, duplicated_linear_class())
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        for item in value if isinstance(value, list) else [value]:
            _duplicate_mla_down_projections(item, seen)


# Where megatron-core 0.19.2's TE spec keeps an MLA layer's norms that the local spec keeps
# in separate modules: TE fuses the q/kv low-rank norms into the up projections and, in
# dense (non-MoE) layers, the pre-MLP norm into ``linear_fc1``. Local prefix -> TE prefix.
_MLA_TE_KEYS = {
    "self_attention.q_layernorm.": "self_attention.linear_q_up_proj.layer_norm_",
    "self_attention.kv_layernorm.": "self_attention.linear_kv_up_proj.layer_norm_",
}
_DENSE_MLP_TE_KEYS = {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


def _is_moe(mlp_spec: Any) -> bool:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    target = getattr(mlp_spec, "func", None) or getattr(mlp_spec, "module", None)
    return isinstance(target, type) and issubclass(target, MoELayer)


def _save_mla_layers_under_te_keys(spec: Any, _seen: set[int] | None = None) -> None:
    """Give local-spec MLA layers the distributed-checkpoint keys of TE's spec.

    Checkpoints must load whichever implementation a job runs (CPU CI and conversion use
    the local spec, GPU clusters TE). megatron-core's local spec already maps dense
    attention layers' norms onto TE's fused ``layer_norm_weight`` keys, but in 0.19.2 not
    MLA layers; without this a DeepSeek-V3 checkpoint converted or trained here would miss
    ``linear_q_up_proj.layer_norm_weight`` & co. when a TE model loads it. Only the saved
    keys change (``sharded_state_dict_keys_map``); module names stay megatron's.
    """
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention
    from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

    seen = _seen if _seen is not None else set()
    if id(spec) in seen or not dataclasses.is_dataclass(spec) or isinstance(spec, type):
        return
    seen.add(id(spec))
    if isinstance(spec, TransformerLayerSubmodules):
        attention = getattr(spec.self_attention, "module", None)
        if isinstance(attention, type) and issubclass(attention, MLASelfAttention):
            keys = dict(spec.sharded_state_dict_keys_map or {})
            keys.update(_MLA_TE_KEYS)
            if not _is_moe(spec.mlp):
                keys.update(_DENSE_MLP_TE_KEYS)
            spec.sharded_state_dict_keys_map = keys
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        for item in value if isinstance(value, list) else [value]:
            _save_mla_layers_under_te_keys(item, seen)


def decoder_block_spec(config: Any, use_te: bool, pp_rank: int | None = None) -> Any:
    """The decoder block spec for this pipeline stage (dense and MoE layers mixed)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    spec = get_gpt_decoder_block_spec(
        config, use_transformer_engine=use_te, normalization="RMSNorm", pp_rank=pp_rank
    )
    if not use_te:
        _localize(spec)
    return spec


def mtp_block_spec(config: Any, block_spec: Any, use_te: bool, pp_rank: int | None = None) -> Any:
    """Multi-token-prediction block spec, or None when this stage holds no MTP layer."""
    if not config.mtp_num_layers:
        return None
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

    spec = get_gpt_mtp_block_spec(
        config, block_spec, use_transformer_engine=use_te, pp_rank=pp_rank
    )
    if spec is not None and not use_te:
        _localize(spec)
    return spec
