"""The SFT loss and one optimizer step, at any TP/PP/EP/CP/DP layout.

The loss is next-token cross-entropy averaged over the response (+ EOS) tokens of the
global batch. The model computes per-token cross-entropy itself (``labels`` given to
megatron-core's ``GPTModel``, vocab-parallel under TP), :func:`~r1mega.training.schedule.lm_loss`
sums it under the loss mask, and megatron-core divides the gradients by the global
count of loss tokens (``calculate_per_token_loss``), so any split of the batch over
microbatches and DP ranks, padded or packed, gives the gradient of the same mean.

With multi-token prediction (DeepSeek-V3) the MTP head is trained too: megatron-core adds
its loss (``model.mtp_loss_scaling_factor``, over the same response tokens shifted) to
the backward pass. Reported losses are the main head's.

Under context parallelism every padded row's tokens are split over the CP ranks
(:mod:`r1mega.training.context_parallel`) and the sums run over DP x CP.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from r1mega.training.context_parallel import cp_size_and_rank, split_microbatch
from r1mega.training.optim import optimizer_update
from r1mega.training.packing import packed_seq_params
from r1mega.training.policy import Policy
from r1mega.training.schedule import forward_backward, lm_loss


def sft_forward(model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """A ``model_forward`` for :func:`forward_backward`: per-token LM loss on the last
    stage (``[b, s]`` padded, ``[1, T]`` packed), hidden states elsewhere."""
    params = packed_seq_params(batch) if "cu_seqlens" in batch else None
    return model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                 attention_mask=None, labels=batch["labels"], loss_mask=batch["loss_mask"],
                 packed_seq_params=params)


def to_device(microbatches: list[dict[str, Tensor]], device: torch.device
              ) -> list[dict[str, Tensor]]:
    """Microbatches on the model's device; ``cu_seqlens`` & co. included (THD kernels
    read them on the GPU), ``max_seqlen`` stays a host scalar."""
    return [{k: v if k == "max_seqlen" else v.to(device) for k, v in mb.items()}
            for mb in microbatches]


def _context_parallel_share(mb: dict[str, Tensor]) -> dict[str, Tensor]:
    """This CP rank's tokens of a padded microbatch (:mod:`r1mega.training.context_parallel`;
    packed ones are refused: their sequences would need a split each)."""
    if cp_size_and_rank()[0] == 1:
        return mb
    if "cu_seqlens" in mb:
        raise ValueError("packed SFT batches are not split over context parallelism: set "
                         "sft.pack_sequences=false or train_layout.cp=1")
    return split_microbatch(mb, ("tokens", "labels", "loss_mask", "position_ids"))


def _global_sums(stats: list[dict[str, Tensor]], device: torch.device) -> Tensor:
    """(loss sum, loss tokens) over microbatches and DP ranks, on every rank: computed
    on the last pipeline stage, broadcast to the others (on ``device``: NCCL needs the
    GPU's)."""
    from megatron.core import parallel_state as ps

    totals = torch.zeros(2, dtype=torch.float64, device=device)
    if ps.is_pipeline_last_stage():
        for s in stats:
            totals += s["lm_loss"].detach().to(device, torch.float64)
        dist.all_reduce(totals, group=ps.get_data_parallel_group(with_context_parallel=True))
    pp_group = ps.get_pipeline_model_parallel_group()
    src = dist.get_global_rank(pp_group, ps.get_pipeline_model_parallel_world_size() - 1)
    dist.broadcast(totals, src=src, group=pp_group)
    return totals


def sft_loss(policy: Policy, microbatches: list[dict[str, Tensor]],
             forward_only: bool = False) -> tuple[float, int]:
    """Mean response-token loss of a global batch and its loss-token count (same on
    every rank); with ``forward_only=False`` the finalized gradients are left in the
    DDP buffers (``param.main_grad``)."""
    device = next(policy.chunks[0].parameters()).device
    microbatches = [_context_parallel_share(mb) for mb in microbatches]
    with torch.set_grad_enabled(not forward_only):
        stats = forward_backward(policy, to_device(microbatches, device), lm_loss,
                                 forward_only=forward_only, model_forward=sft_forward)
    loss_sum, tokens = _global_sums(stats, device).tolist()
    return loss_sum / max(tokens, 1.0), int(tokens)


def sft_step(policy: Policy, optimizer: Any, scheduler: Any,
             microbatches: list[dict[str, Tensor]]) -> dict[str, float]:
    """Forward/backward over this rank's microbatches, clip, optimizer and LR step.

    Returns ``loss`` (mean over the global batch's response tokens, before the update),
    ``response_tokens``, ``grad_norm`` (global, before clipping) and ``lr`` (the rate
    this update used); the same on every rank.
    """
    policy.zero_grad()
    optimizer.zero_grad()
    loss, tokens = sft_loss(policy, microbatches)
    lr, grad_norm = optimizer_update(optimizer, scheduler)
    return {"loss": loss, "response_tokens": float(tokens), "grad_norm": grad_norm,
            "lr": lr}
