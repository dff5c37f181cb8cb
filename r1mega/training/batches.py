"""Split a global batch into this rank's microbatches."""

from __future__ import annotations

import torch


def causal_lm_batch(tokens: torch.Tensor, loss_mask: torch.Tensor | None = None
                    ) -> dict[str, torch.Tensor]:
    """A next-token batch from ``[B, S+1]`` token ids: inputs, shifted labels, mask."""
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    batch_size, seq_length = inputs.shape
    mask = torch.ones_like(labels, dtype=torch.float32) if loss_mask is None else loss_mask
    return {
        "tokens": inputs,
        "labels": labels,
        "loss_mask": mask.to(torch.float32),
        "position_ids": torch.arange(seq_length).unsqueeze(0).expand(batch_size, -1).contiguous(),
    }


def data_parallel_microbatches(global_batch: dict[str, torch.Tensor], micro_batch_size: int,
                               dp_rank: int, dp_size: int) -> list[dict[str, torch.Tensor]]:
    """This DP rank's contiguous share of the global batch, cut into microbatches."""
    batch_size = next(iter(global_batch.values())).shape[0]
    if batch_size % (dp_size * micro_batch_size):
        raise ValueError(
            f"global batch of {batch_size} sequences does not split into DP={dp_size} ranks x "
            f"micro_batch_size={micro_batch_size}"
        )
    per_rank = batch_size // dp_size
    start = dp_rank * per_rank
    return [
        {k: v[i:i + micro_batch_size] for k, v in global_batch.items()}
        for i in range(start, start + per_rank, micro_batch_size)
    ]
