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


def _spec_nodes(spec: Any) -> list[Any]:
    """Every dataclass instance (``ModuleSpec``, ``*Submodules``) in a nested megatron
    spec, each once: layers share spec objects, and the passes below edit them in place."""
    nodes: list[Any] = []
    seen: set[int] = set()
    stack = [spec]
    while stack:
        node = stack.pop()
        if id(node) in seen or not dataclasses.is_dataclass(node) or isinstance(node, type):
            continue
        seen.add(id(node))
        nodes.append(node)
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            stack.extend(value if isinstance(value, list) else [value])
    return nodes


def _replace_in_spec(spec: Any, old: type, new: type) -> None:
    """Replace every reference to ``old`` by ``new`` in a (nested) megatron module spec."""
    for node in _spec_nodes(spec):
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if value is old:
                setattr(node, f.name, new)
            elif isinstance(value, list):
                value[:] = [new if item is old else item for item in value]


def _localize(spec: Any) -> None:
    """Make a local (non-TE) spec run on the CPU platform: SDPA attention, SP-aware norms."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    _replace_in_spec(spec, DotProductAttention, SDPACoreAttention)
    _replace_in_spec(spec, WrappedTorchNorm, SequenceParallelRMSNorm)
    _duplicate_mla_down_projections(spec)
    _save_mla_layers_under_te_keys(spec)


def _duplicate_mla_down_projections(spec: Any) -> None:
    """Give MLA duplicated q/kv down projections, as TE's spec does (platform note 7)."""
    for node in _spec_nodes(spec):
        for name in ("linear_q_down_proj", "linear_kv_down_proj"):
            if getattr(node, name, None) is not None:
                setattr(node, name, duplicated_linear_class())


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


def _save_mla_layers_under_te_keys(spec: Any) -> None:
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

    for node in _spec_nodes(spec):
        if not isinstance(node, TransformerLayerSubmodules):
            continue
        attention = getattr(node.self_attention, "module", None)
        if isinstance(attention, type) and issubclass(attention, MLASelfAttention):
            keys = dict(node.sharded_state_dict_keys_map or {})
            keys.update(_MLA_TE_KEYS)
            if not _is_moe(node.mlp):
                keys.update(_DENSE_MLP_TE_KEYS)
            node.sharded_state_dict_keys_map = keys


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
