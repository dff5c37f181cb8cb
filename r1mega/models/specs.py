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
