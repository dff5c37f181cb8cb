"""Which Hugging Face tensors make which megatron tensors, per architecture.

A mapping is a list of :class:`TensorGroup`: a few HF tensors and the megatron tensors
made from them, with the transform each way. Megatron tensors are named by the
*module* state-dict keys of the model built at world size 1 (``decoder.layers.3.
self_attention.linear_qkv.weight``): readable, one per layer, and turned into global
distributed-checkpoint keys and shards by megatron itself
(:mod:`r1mega.convert.megatron_layout`), so mappings never restate megatron's sharding.
Transforms only reshape, split and concatenate, so both directions are bit-exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

Transform = Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]


def _same(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return list(tensors)


@dataclass(frozen=True)
class TensorGroup:
    """HF tensors ``hf`` <-> megatron tensors ``megatron`` of one unit.

    ``alias`` groups describe HF tensors that are copies of a megatron tensor produced
    by another group (DeepSeek-V3's MTP layer repeats the embedding and output head,
    which megatron shares): HF -> megatron only checks them, megatron -> HF writes the
    copy.
    """

    hf: tuple[str, ...]
    megatron: tuple[str, ...]
    to_megatron: Transform = _same
    to_hf: Transform = _same
    alias: bool = False


def copy(hf: str, megatron: str) -> TensorGroup:
    """A tensor that is the same on both sides."""
    return TensorGroup((hf,), (megatron,))


def concat(hf: Sequence[str], megatron: str, dim: int = 0) -> TensorGroup:
    """A megatron tensor that concatenates HF tensors along ``dim`` (SwiGLU's
    ``linear_fc1 = [gate; up]``)."""

    def to_megatron(ts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.cat(list(ts), dim=dim)]

    def to_hf(ts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        parts = len(hf)
        return [t.contiguous() for t in torch.chunk(ts[0], parts, dim=dim)]

    return TensorGroup(tuple(hf), (megatron,), to_megatron, to_hf)


def groups_for(model_cfg: Any) -> list[TensorGroup]:
    """The tensor groups of ``model_cfg``'s architecture, in HF checkpoint order."""
    from r1mega.convert.mappings import deepseek_v3, dense

    if model_cfg.arch in ("llama", "qwen2"):
        return dense.groups(model_cfg)
    if model_cfg.arch == "deepseek_v3":
        return deepseek_v3.groups(model_cfg)
    raise ValueError(f"no tensor mapping for arch {model_cfg.arch!r}")


__all__ = ["TensorGroup", "Transform", "concat", "copy", "groups_for"]
