"""Block-wise FP8 quantization of weights: 128x128 blocks, E4M3 values, fp32 scales.

This is the weight format of DeepSeek-V3's FP8 release and of TE's ``blockwise`` recipe
for weights: every 128x128 block (edge blocks partial) gets one scale, so an outlier only
costs precision inside its own block. It is the inverse of
:func:`r1mega.convert.fp8.weight_dequant` (the checkpoint reader), with the same storage
convention: ``weight ~= q.float() * scale_inv`` per block, where
``scale_inv = amax(block) / 448`` and 448 is E4M3's largest finite value.

Uses: writing FP8 checkpoints in the release's format, and FP8 generation weights
(quantized while resharding, half the bytes a decode step reads). The latter also needs a
generation model whose linear layers *consume* FP8 weights (TE layers built under
``fp8_model_init`` with the blockwise recipe); that needs TE on a GPU and is not wired yet.
"""

from __future__ import annotations

import torch

from r1mega.convert.fp8 import DEFAULT_BLOCK, scale_shape

__all__ = ["E4M3_MAX", "block_quantize"]

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448.0
# Smallest amax a block may have: an all-zero block gets this scale (its values stay 0).
_MIN_AMAX = 1e-12


def block_quantize(weight: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale_inv)``: ``q`` float8_e4m3fn of ``weight``'s shape, ``scale_inv`` float32
    of :func:`~r1mega.convert.fp8.scale_shape` (one per block).

    Each block is divided by its ``scale_inv`` so its largest magnitude maps to 448, then
    rounded to E4M3 (round to nearest even, as the torch cast does). Computed in float32
    on ``weight``'s device; the padding of partial edge blocks never enters an amax.
    """
    if weight.dim() != 2:
        raise ValueError(f"block quantization needs a 2-D weight, got {tuple(weight.shape)}")
    rows, cols = weight.shape
    br, bc = block
    nr, nc = scale_shape((rows, cols), block)
    padded = torch.zeros(nr * br, nc * bc, dtype=torch.float32, device=weight.device)
    padded[:rows, :cols] = weight.float()
    tiles = padded.view(nr, br, nc, bc)
    amax = tiles.abs().amax(dim=(1, 3)).clamp_min(_MIN_AMAX)  # [nr, nc]
    scale_inv = amax / E4M3_MAX
    scaled = tiles / scale_inv[:, None, :, None]
    # |scaled| <= 448 up to float32 rounding of the division; clamp so the cast never
    # overflows to NaN (E4M3 has no infinity).
    scaled = scaled.clamp(-E4M3_MAX, E4M3_MAX)
    q = scaled.view(nr * br, nc * bc)[:rows, :cols].to(torch.float8_e4m3fn)
    return q.contiguous(), scale_inv
