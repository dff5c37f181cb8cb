"""Context parallelism (CP) in the RL and SFT steps: which tokens each CP rank holds.

With ``train_layout.cp = c``, every sequence of a (padded) microbatch is cut into ``2c``
equal chunks and CP rank ``r`` holds chunks ``r`` and ``2c - 1 - r``: under causal
attention the early chunks are cheap and the late ones expensive, so each rank gets one
of each (megatron-core's load-balanced layout; its rotary embeddings and MTP rolls are
sliced the same way, so the split is megatron's own ``get_batch_on_this_cp_rank``).
Attention then needs every earlier key and value of the sequence: on GPU Transformer
Engine's ring attention exchanges them, on CPU the platform layer's SDPA attention
all-gathers them over the CP group (:mod:`parallel.platform`).

Everything per token (inputs, labels, masks, log-probabilities) is split the same way;
everything per sequence (advantages, rewards) is not. Losses that aggregate per
sequence see only part of each sequence on a rank: :func:`cp_seq_reduce` sums a
per-sequence quantity over the CP group (the ``seq_reduce`` of
:func:`r1mega.algorithms.policy_loss.policy_loss_terms`). Gradients are summed over
DP x CP by megatron's DDP and divided by the loss denominator summed over DP x CP.

Packed (THD) microbatches are not split over CP (validation refuses the combination,
``train.pack_sequences`` / ``sft.pack_sequences``): every packed sequence would need its
own ``2c``-chunk padding and split.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from parallel.layout import context_parallel_positions


def cp_size_and_rank() -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    return ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()


def split_microbatch(mb: dict[str, Any], per_token_keys: tuple[str, ...] | None = None
                     ) -> dict[str, Any]:
    """This CP rank's part of a padded microbatch: every per-token ``[b, s, ...]``
    tensor cut to the rank's two chunks (``[b, s / cp, ...]``), everything else kept.

    ``per_token_keys`` names the per-token entries; by default every tensor whose first
    two dimensions are the microbatch's ``tokens`` shape.
    """
    cp_size, _ = cp_size_and_rank()
    if cp_size == 1:
        return mb
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_batch_on_this_cp_rank

    shape = tuple(mb["tokens"].shape[:2])
    if per_token_keys is None:
        per_token_keys = tuple(k for k, v in mb.items()
                               if isinstance(v, Tensor) and tuple(v.shape[:2]) == shape)
    per_token = {k: mb[k] for k in per_token_keys}
    split = get_batch_on_this_cp_rank({**per_token, "cu_seqlens": None}, is_hybrid_cp=False,
                                      cp_group=ps.get_context_parallel_group())
    split.pop("cu_seqlens")
    return {**mb, **split}


def cp_seq_reduce() -> Callable[[Tensor], Tensor] | None:
    """Sum of a per-sequence ``[b]`` tensor over the CP group (None without CP).

    Used on detached quantities only (token counts, GSPO's mean log-ratio), so a plain
    all-reduce of a copy is enough: no gradient flows through it.
    """
    cp_size, _ = cp_size_and_rank()
    if cp_size == 1:
        return None
    from megatron.core import parallel_state as ps

    group = ps.get_context_parallel_group()

    def reduce(values: Tensor) -> Tensor:
        total = values.detach().clone()
        dist.all_reduce(total, group=group)
        return total

    return reduce


def gather_token_values(values: Tensor, seq_length: int) -> Tensor:
    """A per-token ``[b, s / cp, ...]`` tensor of this rank back to the full ``[b, s, ...]``
    sequence, on every CP rank (for reporting and tests; no gradient)."""
    cp_size, _ = cp_size_and_rank()
    if cp_size == 1:
        return values
    from megatron.core import parallel_state as ps

    parts = [torch.empty_like(values) for _ in range(cp_size)]
    dist.all_gather(parts, values.detach().contiguous(), group=ps.get_context_parallel_group())
    out = values.new_zeros(values.shape[0], seq_length, *values.shape[2:])
    for rank, part in enumerate(parts):
        out[:, context_parallel_positions(seq_length, rank, cp_size)] = part
    return out


__all__ = ["cp_seq_reduce", "cp_size_and_rank", "gather_token_values", "split_microbatch"]
