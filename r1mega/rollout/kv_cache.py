"""A slot-based KV cache for continuous batching, on megatron-core's static inference context.

megatron-core's ``StaticInferenceContext`` keeps one key/value buffer per attention layer,
``[max_seq, max_batch, heads, dim]``, and every forward pass writes at one shared sequence
offset for a contiguous range of batch rows. Its own generation loop therefore runs a
fixed batch in lock step. Continuous batching needs rows that start and finish at
different times; this module provides them on top of the same buffers:

* **Left alignment.** Every row's latest token sits at the shared offset ``o``; a row's
  tokens occupy ``[start, o]`` and everything left of ``start`` is masked out. Rotary
  embeddings depend only on relative positions, so a row whose tokens sit at absolute
  positions ``start..o`` attends exactly as it would at ``0..o-start``.
* **Slots.** A finished row frees its slot. A waiting request is prefilled in a separate
  *scratch* context at positions ``[o - L, o)`` (its prompt right-aligned to the shared
  offset, so keys cached with rotary already applied, as MLA caches them, carry the right
  positions) and its rows are copied into the free slot.
* **Compaction.** When ``o`` reaches the end of the buffers, the engine re-prefills the
  live rows from position 0 (their prompt plus what they generated so far).

Masks are boolean ``[b, 1, sq, sk]``, True where attention is blocked (megatron's
convention), and never block a query's own position, so no row is fully masked.
"""

from __future__ import annotations

from typing import Any

import torch


def attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """The self-attention module of every decoder layer, by megatron ``layer_number``."""
    from megatron.core.transformer.attention import Attention
    from megatron.core.transformer.multi_latent_attention import MultiLatentAttention

    found = {}
    for module in model.modules():
        if isinstance(module, (Attention, MultiLatentAttention)):
            found[module.layer_number] = module
    return found


class CacheBuffers:
    """One megatron ``StaticInferenceContext`` with zero-filled buffers of ``rows`` x
    ``length`` for every attention layer (megatron would allocate them uninitialised on
    first use; masked-out garbage must not be NaN, which would leak through ``0 * NaN``)."""

    def __init__(self, model: torch.nn.Module, rows: int, length: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        from megatron.core.inference.contexts import StaticInferenceContext

        self.rows, self.length = rows, length
        self.context = StaticInferenceContext(max_batch_size=rows, max_sequence_length=length)
        for number, attn in attention_modules(model).items():
            groups = attn.num_query_groups_per_partition
            self.context.key_value_memory_dict[number] = (
                torch.zeros(length, rows, groups, attn.key_hidden_size, dtype=dtype,
                            device=device),
                torch.zeros(length, rows, groups, attn.val_hidden_size, dtype=dtype,
                            device=device),
            )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for pair in self.context.key_value_memory_dict.values() for t in pair)

    def at(self, offset: int, first_row: int = 0) -> Any:
        """The context, positioned to write at ``offset`` into rows from ``first_row``."""
        ctx = self.context
        ctx.sequence_len_offset = offset
        ctx.batch_size_offset = first_row
        if offset > 0:
            ctx.enable_decode_mode()
        else:
            ctx.enable_prefill_mode()
        return ctx

    def copy_rows_to(self, other: CacheBuffers, rows: list[int], slots: list[int],
                     begin: int, end: int) -> None:
        """Copy positions ``[begin, end)`` of our ``rows`` into ``other``'s ``slots``."""
        src, dst = self.context.key_value_memory_dict, other.context.key_value_memory_dict
        index = torch.tensor(rows, device=next(iter(src.values()))[0].device)
        for number, (key, value) in src.items():
            dst_key, dst_value = dst[number]
            for row_src, slot in zip(index.tolist(), slots, strict=True):
                dst_key[begin:end, slot].copy_(key[begin:end, row_src])
                dst_value[begin:end, slot].copy_(value[begin:end, row_src])

    def release(self) -> None:
        """Free the buffers (the engine builds new ones for the next generation)."""
        self.context.key_value_memory_dict.clear()


def prefill_mask(starts: list[int], offset: int, width: int, device: torch.device
                 ) -> torch.Tensor:
    """Mask for ``width`` new tokens per row at positions ``[offset, offset + width)``:
    causal, and blind left of each row's ``start``."""
    keys = torch.arange(offset + width, device=device)
    queries = torch.arange(offset, offset + width, device=device)
    causal = keys[None, :] > queries[:, None]  # [sq, sk]
    before = keys[None, :] < torch.tensor(starts, device=device)[:, None]  # [b, sk]
    return (causal[None] | before[:, None, :])[:, None]  # [b, 1, sq, sk]


def decode_mask(starts: list[int], offset: int, device: torch.device) -> torch.Tensor:
    """Mask for one new token per row at position ``offset``."""
    keys = torch.arange(offset + 1, device=device)
    before = keys[None, :] < torch.tensor(starts, device=device)[:, None]
    return before[:, None, None, :]  # [b, 1, 1, sk]
