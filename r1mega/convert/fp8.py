"""Dequantization of DeepSeek-V3's released FP8 weights.

The release stores most linear weights as ``float8_e4m3fn`` with a companion
``<name>_scale_inv`` tensor holding one float32 scale per 128x128 block (edge blocks
partial). DeepSeek's reference (``inference/kernel.py: weight_dequant``, used by
``fp8_cast_bf16.py``) computes ``y = x.float() * s`` per block and stores ``y`` in the
default dtype, bfloat16. :func:`weight_dequant` reproduces that bit for bit in plain
PyTorch; the converter then casts the bfloat16 result to the target dtype.
"""

from __future__ import annotations

import re

import torch

FP8_DTYPES = (torch.float8_e4m3fn,)
SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK = (128, 128)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def scale_shape(shape: tuple[int, ...], block: tuple[int, int] = DEFAULT_BLOCK
                ) -> tuple[int, int]:
    """Shape of the ``weight_scale_inv`` of a 2-D weight: one scale per (partial) block."""
    rows, cols = shape
    return (-(-rows // block[0]), -(-cols // block[1]))


def weight_dequant(weight: torch.Tensor, scale_inv: torch.Tensor,
                   block: tuple[int, int] = DEFAULT_BLOCK) -> torch.Tensor:
    """bfloat16 ``weight * scale_inv`` with each scale covering one ``block`` (the last
    row/column blocks may be partial), computed in float32 as the reference kernel does."""
    if weight.dim() != 2:
        raise ValueError(f"FP8 block dequantization needs a 2-D weight, got {tuple(weight.shape)}")
    rows, cols = weight.shape
    expected = scale_shape((rows, cols), block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not match weight "
                         f"{(rows, cols)} in {block} blocks (expected {expected})")
    out = torch.empty((rows, cols), dtype=torch.bfloat16)
    # A few row blocks at a time: the float32 temporaries stay small for 18432 x 7168
    # weights, and the elementwise product is the same as the whole-tensor one.
    step = block[0] * 8
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        scale = scale_inv[r0 // block[0]:-(-r1 // block[0])].float()
        scale = scale.repeat_interleave(block[0], dim=0)[: r1 - r0]
        scale = scale.repeat_interleave(block[1], dim=1)[:, :cols]
        out[r0:r1] = weight[r0:r1].float() * scale
    return out


# The decoder layers' linear weights (attention projections, dense, shared and routed
# expert MLPs): what DeepSeek-V3's release stores in FP8. Embeddings, the output head,
# norms, the router and MTP's eh_proj stay bfloat16.
_RELEASE_FP8 = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\..*_proj\.weight")


def is_release_fp8_weight(name: str) -> bool:
    """Whether DeepSeek-V3's FP8 release stores HF tensor ``name`` block-quantized."""
    return _RELEASE_FP8.fullmatch(name) is not None


def quantization_config(block: tuple[int, int] = DEFAULT_BLOCK) -> dict[str, object]:
    """The release's ``config.json`` ``quantization_config`` for ``block``-sized scales."""
    return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
            "weight_block_size": list(block)}
