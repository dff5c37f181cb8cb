"""Padding-free ("packed") microbatches for the RL forward passes.

Rollouts have very different lengths; padding every row of a microbatch to the longest
one spends most of the forward/backward on padding. A packed microbatch concatenates the
rows' real tokens into one sequence of ``T = sum(lengths)`` tokens (batch dimension 1)
and tells megatron-core where each sequence starts through ``cu_seqlens`` (THD format,
``PackedSeqParams``): attention stays within each sequence and rotary embeddings restart
at every sequence start, so every real token sees exactly what it saw in the padded row.

Layout of a packed microbatch (:func:`pack_microbatch`):

* ``tokens`` / ``labels`` / ``loss_mask`` / ``position_ids``: ``[1, T]``; positions
  restart at 0 for each sequence (megatron derives the rotary positions from
  ``cu_seqlens``, so this is what the model actually uses);
* every per-token ``[b, s, ...]`` extra (``old_logp``, ``ref_logp``, ``rollout_logp``)
  packed the same way to ``[1, T, ...]``; every per-row ``[b]`` extra (``advantages``)
  repeated over its row's tokens to ``[1, T]`` (the policy loss accepts per-token
  advantages);
* ``T`` optionally rounded up (``pad_to_multiple``: TP size under sequence parallelism,
  which splits the sequence dimension over TP ranks; ``total_length``: one fixed ``T``
  for every microbatch, which pipeline parallelism needs since the P2P buffers have one
  shape) with a dummy segment of its own whose ``loss_mask`` is 0;
* ``cu_seqlens`` (int32 ``[n + 1]``, the dummy segment included, empty rows left out)
  and ``max_seqlen`` (0-dim int64) for :func:`packed_seq_params`;
* ``lengths`` (``[b]``) and ``padded_seq_length`` (0-dim, the padded ``s``), from which
  :func:`unpack_tokens` puts per-token results back into the padded ``[b, s]`` layout.

Losses that aggregate per sequence (``seq-mean-token-mean``, Dr. GRPO, GSPO's sequence
ratio) need the row structure: unpack the per-token log-probabilities with
:func:`unpack_tokens` (differentiable) and compute the loss in the padded layout. The
token-mean loss can be computed on the packed tensors directly.

Not covered: context parallelism (each sequence would have to be split into 2 * CP
chunks and padded per sequence, ``cu_seqlens_*_padded``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

#: Keys whose ``[b, s]`` layout is replaced by the packed one (the rest are extras).
CORE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
#: Bookkeeping keys of a packed microbatch (not model inputs, not per-token values).
META_KEYS = ("cu_seqlens", "max_seqlen", "lengths", "padded_seq_length")
#: Keys of a padded microbatch that have no meaning once packed.
_DROPPED_KEYS = ("attention_mask",)


def valid_lengths(loss_mask: Tensor) -> Tensor:
    """Per-row valid length ``[b]`` = one past the last position with ``loss_mask > 0``.

    Positions after the last loss position cannot influence any loss token (attention is
    causal), so they need not be packed. Rows without any loss token get length 0 and
    cost nothing (e.g. groups dropped by zeroing their mask).
    """
    b, s = loss_mask.shape
    positions = torch.arange(1, s + 1, device=loss_mask.device).expand(b, s)
    return torch.where(loss_mask > 0, positions, torch.zeros_like(positions)).amax(dim=1)


def pack_microbatch(mb: dict[str, Tensor], pad_to_multiple: int = 1,
                    total_length: int | None = None) -> dict[str, Tensor]:
    """Pack a padded microbatch (with ``lengths`` ``[b]``) into one THD sequence.

    Args:
        mb: ``tokens``/``labels``/``loss_mask``/``position_ids`` ``[b, s]``, ``lengths``
            ``[b]`` (real tokens per row; everything after is padding and is dropped), and
            any per-row ``[b]`` or per-token ``[b, s, ...]`` extras.
        pad_to_multiple: round the packed length up to a multiple of this (the TP size
            when sequence parallelism is on).
        total_length: pad the packed length to exactly this many tokens (e.g. one shape
            for all microbatches under pipeline parallelism); must be a multiple of
            ``pad_to_multiple`` and at least the packed length.

    Returns the packed dict described in the module docstring.
    """
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    missing = [k for k in (*CORE_KEYS, "lengths") if k not in mb]
    if missing:
        raise KeyError(f"pack_microbatch needs {missing} in the microbatch")
    b, s = mb["tokens"].shape
    lengths = mb["lengths"].to(torch.long).cpu()
    if lengths.shape != (b,) or bool((lengths < 0).any()) or bool((lengths > s).any()):
        raise ValueError(f"lengths must be [{b}] with values in [0, {s}], got {mb['lengths']}")
    device = mb["tokens"].device
    real = int(lengths.sum())
    padded = -(-max(real, 1) // pad_to_multiple) * pad_to_multiple
    if total_length is not None:
        if total_length < padded or total_length % pad_to_multiple:
            raise ValueError(f"total_length={total_length} must be >= {padded} (the packed "
                             f"length) and a multiple of pad_to_multiple={pad_to_multiple}")
        padded = total_length
    pad = padded - real

    # Gather index of every real token in the flattened [b * s] layout, row by row.
    rows = torch.repeat_interleave(torch.arange(b), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    cols = torch.arange(real) - torch.repeat_interleave(starts, lengths)
    flat_index = (rows * s + cols).to(device)

    def pack_tokens(values: Tensor) -> Tensor:
        packed = values.reshape(b * s, *values.shape[2:]).index_select(0, flat_index)
        if pad:
            packed = torch.cat([packed, packed.new_zeros(pad, *packed.shape[1:])])
        return packed.unsqueeze(0)

    out: dict[str, Tensor] = {}
    for key, value in mb.items():
        if key in META_KEYS or key in _DROPPED_KEYS or key == "position_ids":
            continue
        if value.dim() >= 2 and tuple(value.shape[:2]) == (b, s):
            out[key] = pack_tokens(value)
        elif value.shape == (b,):
            per_token = torch.repeat_interleave(value, lengths.to(value.device))
            if pad:
                per_token = torch.cat([per_token, per_token.new_zeros(pad)])
            out[key] = per_token.unsqueeze(0)
        else:
            raise ValueError(f"cannot pack {key!r} of shape {tuple(value.shape)}: expected "
                             f"per-row [{b}] or per-token [{b}, {s}, ...]")

    seqlens = [n for n in lengths.tolist() if n > 0] + ([pad] if pad else [])
    cu_seqlens = torch.zeros(len(seqlens) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(seqlens, dtype=torch.int32), 0)
    out["position_ids"] = torch.cat([torch.arange(n) for n in seqlens]).unsqueeze(0).to(
        device=device, dtype=mb["position_ids"].dtype)
    out["cu_seqlens"] = cu_seqlens.to(device)
    out["max_seqlen"] = torch.tensor(max(seqlens), dtype=torch.int64)
    out["lengths"] = lengths.to(device)
    out["padded_seq_length"] = torch.tensor(s, dtype=torch.int64)
    return out


def unpack_tokens(values: Tensor, packed: dict[str, Tensor]) -> Tensor:
    """Per-token ``values`` ``[1, T, ...]`` of a packed microbatch back to ``[b, s, ...]``.

    Padding positions (and the dummy segment's values) become 0. Differentiable, so a
    loss that needs the row structure can be computed on the unpacked tensors.
    """
    lengths = packed["lengths"].to(torch.long).cpu()
    b, s = lengths.numel(), int(packed["padded_seq_length"])
    real = int(lengths.sum())
    if values.dim() < 2 or values.shape[0] != 1 or values.shape[1] < real:
        raise ValueError(f"expected packed values [1, >={real}, ...], got {tuple(values.shape)}")
    rows = torch.repeat_interleave(torch.arange(b), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    cols = torch.arange(real) - torch.repeat_interleave(starts, lengths)
    flat_index = (rows * s + cols).to(values.device)
    trailing = values.shape[2:]
    out = values.new_zeros(b * s, *trailing).index_copy(0, flat_index, values[0, :real])
    return out.reshape(b, s, *trailing)


def packed_seq_params(packed: dict[str, Tensor]) -> Any:
    """megatron-core ``PackedSeqParams`` (THD) for a packed microbatch.

    Every sequence occupies exactly its length (the only padding is a dummy sequence of
    its own), so the ``*_padded`` offsets equal the real ones; megatron prefers the padded
    variants where it has both (rotary embeddings, TE attention).
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    cu_seqlens = packed["cu_seqlens"].to(torch.int32)
    max_seqlen = int(packed["max_seqlen"])
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        cu_seqlens_q_padded=cu_seqlens,
        cu_seqlens_kv_padded=cu_seqlens,
        max_seqlen_q=max_seqlen,
        max_seqlen_kv=max_seqlen,
    )


def packed_rl_forward(model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """``rl_forward`` (:mod:`r1mega.training.grpo_step`) for packed or padded
    microbatches: a ``model_forward`` for :func:`r1mega.training.schedule.forward_backward`.

    With ``cu_seqlens`` in the batch the stage runs in THD format and the last stage
    returns vocab-parallel logits ``[1, T, V/tp]``; without it, ``[b, s, V/tp]``.

    As in ``rl_forward``, a model with multi-token prediction gets an all-zero
    ``loss_mask``: without labels megatron-core derives next-token labels for the MTP
    head and adds its loss to the backward pass, and RL does not train that head.
    (The model's ``padding_mask``, which would keep padding out of the MoE router's
    expert-bias token counts, is not passed: megatron-core 0.19.2's
    ``TopKRouter._apply_expert_bias`` combines the ``[tokens]`` mask with the
    ``[tokens, experts]`` routing map without broadcasting and fails whenever expert
    bias is on; NVIDIA/Megatron-LM#6111, fixed upstream by #6114.)
    """
    params = packed_seq_params(batch) if "cu_seqlens" in batch else None
    loss_mask = torch.zeros_like(batch["tokens"], dtype=torch.float32) \
        if getattr(model.config, "mtp_num_layers", None) else None
    return model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                 attention_mask=None, packed_seq_params=params, loss_mask=loss_mask)
