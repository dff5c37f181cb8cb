"""One SFT global batch as this rank's microbatches: padded, or packed (THD).

A global batch is ``train.global_batch_size`` rows; DP rank ``r`` of ``d`` takes the
contiguous ``r``-th ``1/d`` of them. The loss is the mean over the response tokens of the
whole global batch either way (megatron-core divides the summed per-token losses by the
global token count), so the two layouts below are two ways to compute the same step:

* **padded**: microbatches of ``train.micro_batch_size`` rows, right-padded to the
  longest row of the global batch;
* **packed** (``sft.pack_sequences``): the rank's rows are bin-packed (first fit
  decreasing) into sequences of at most ``train.seq_length`` tokens, each sequence one
  THD microbatch whose rows attend only within themselves
  (:func:`r1mega.training.packing.pack_microbatch`, ``cu_seqlens``);
  ``train.micro_batch_size`` does not apply. Short rows stop costing a padded row each.

Every microbatch of the job has one shape (pipeline stages exchange fixed-size buffers
and MoE token dispatch is collective), and every DP rank runs the same number of them: a
rank with fewer packed sequences gets empty ones (only a loss-free padding segment).
All of this is computed from the global batch's row lengths, which every rank knows, so
no communication is needed. Lengths are rounded up to ``pad_multiple`` (the TP size
under sequence parallelism, which splits the sequence dimension over TP ranks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from r1mega.sft.data import SFTExample
from r1mega.training.packing import pack_microbatch


@dataclass
class StepBatch:
    """This rank's microbatches of one global batch, and the global batch's sizes."""

    microbatches: list[dict[str, Tensor]]
    rows: int
    real_tokens: int  # input positions holding real tokens, whole global batch
    computed_tokens: int  # input positions computed (real + padding), whole global batch
    response_tokens: int  # loss tokens, whole global batch

    @property
    def padding_frac(self) -> float:
        return 1.0 - self.real_tokens / max(self.computed_tokens, 1)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def padded_microbatch(examples: Sequence[SFTExample], width: int, pad_id: int
                      ) -> dict[str, Tensor]:
    """``[b, width]`` inputs, shifted labels, response-only loss mask, positions, and the
    real ``lengths``; padding (``pad_id``, mask 0) at the end of each row, where causal
    attention keeps it from influencing real tokens."""
    b = len(examples)
    tokens = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((b, width), dtype=torch.float32)
    for i, ex in enumerate(examples):
        ids, n = ex.ids, ex.num_inputs
        if n > width:
            raise ValueError(f"row of {n} input tokens does not fit width {width}")
        tokens[i, :n] = torch.tensor(ids[:-1])
        labels[i, :n] = torch.tensor(ids[1:])
        loss_mask[i, :n] = torch.tensor(ex.loss_mask())
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
            "position_ids": torch.arange(width).expand(b, width).contiguous(),
            "lengths": torch.tensor([ex.num_inputs for ex in examples], dtype=torch.long)}


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of total length <= ``capacity``: longest
    first, each into the first bin with room. Deterministic (ties keep input order)."""
    bins: list[list[int]] = []
    fill: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        if lengths[i] > capacity:
            raise ValueError(f"row of {lengths[i]} tokens exceeds the packing capacity "
                             f"{capacity}")
        for k, used in enumerate(fill):
            if used + lengths[i] <= capacity:
                bins[k].append(i)
                fill[k] += lengths[i]
                break
        else:
            bins.append([i])
            fill.append(lengths[i])
    return bins


def _dp_shares(examples: Sequence[SFTExample], dp_size: int) -> list[Sequence[SFTExample]]:
    if len(examples) % dp_size:
        raise ValueError(f"global batch of {len(examples)} rows does not split over "
                         f"DP={dp_size} ranks")
    k = len(examples) // dp_size
    return [examples[r * k:(r + 1) * k] for r in range(dp_size)]


def padded_step_batch(examples: Sequence[SFTExample], dp_rank: int, dp_size: int,
                      micro_batch_size: int, pad_id: int, pad_multiple: int = 1) -> StepBatch:
    """Padded microbatches of this rank's share (all of one width job-wide)."""
    share = _dp_shares(examples, dp_size)[dp_rank]
    if len(share) % micro_batch_size:
        raise ValueError(f"{len(share)} rows per DP rank do not split into microbatches "
                         f"of {micro_batch_size}")
    width = round_up(max(ex.num_inputs for ex in examples), pad_multiple)
    mbs = [padded_microbatch(share[i:i + micro_batch_size], width, pad_id)
           for i in range(0, len(share), micro_batch_size)]
    return StepBatch(mbs, rows=len(examples),
                     real_tokens=sum(ex.num_inputs for ex in examples),
                     computed_tokens=len(examples) * width,
                     response_tokens=sum(len(ex.response_ids) for ex in examples))


def _empty_microbatch(pad_id: int, total_length: int) -> dict[str, Tensor]:
    """A packed microbatch with no rows: one padding segment, no loss tokens."""
    empty = {"tokens": torch.full((1, 1), pad_id, dtype=torch.long),
             "labels": torch.full((1, 1), pad_id, dtype=torch.long),
             "loss_mask": torch.zeros((1, 1)), "position_ids": torch.zeros((1, 1),
                                                                           dtype=torch.long),
             "lengths": torch.zeros(1, dtype=torch.long)}
    return pack_microbatch(empty, total_length=total_length)


def packed_step_batch(examples: Sequence[SFTExample], dp_rank: int, dp_size: int,
                      capacity: int, pad_id: int, pad_multiple: int = 1) -> StepBatch:
    """Packed microbatches (one THD sequence of <= ``capacity`` real tokens each) of this
    rank's share; every rank gets as many as the rank that needs the most, all padded to
    the fullest sequence of the job."""
    shares = _dp_shares(examples, dp_size)
    bins = [first_fit_decreasing([ex.num_inputs for ex in share], capacity)
            for share in shares]
    num_sequences = max(len(b) for b in bins)
    fullest = max(sum(share[i].num_inputs for i in b)
                  for share, share_bins in zip(shares, bins, strict=True) for b in share_bins)
    total = round_up(fullest, pad_multiple)
    share = shares[dp_rank]
    mbs = []
    for b in bins[dp_rank]:
        rows = [share[i] for i in b]
        padded = padded_microbatch(rows, max(ex.num_inputs for ex in rows), pad_id)
        mbs.append(pack_microbatch(padded, pad_to_multiple=pad_multiple, total_length=total))
    mbs += [_empty_microbatch(pad_id, total) for _ in range(num_sequences - len(mbs))]
    return StepBatch(mbs, rows=len(examples),
                     real_tokens=sum(ex.num_inputs for ex in examples),
                     computed_tokens=dp_size * num_sequences * total,
                     response_tokens=sum(len(ex.response_ids) for ex in examples))


def step_batch(examples: Sequence[SFTExample], *, pack: bool, dp_rank: int, dp_size: int,
               micro_batch_size: int, seq_length: int, pad_id: int, pad_multiple: int = 1
               ) -> StepBatch:
    """This rank's microbatches of the global batch ``examples`` (see module docstring)."""
    if pack:
        return packed_step_batch(examples, dp_rank, dp_size, seq_length, pad_id, pad_multiple)
    return padded_step_batch(examples, dp_rank, dp_size, micro_batch_size, pad_id,
                             pad_multiple)
