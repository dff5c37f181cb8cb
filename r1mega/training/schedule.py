"""Forward/backward over microbatches through megatron-core's pipeline schedules.

A microbatch is a dict of tensors shaped ``[micro_batch_size, seq_length]`` (``tokens``,
``position_ids``, ``labels``, ``loss_mask`` and whatever the loss needs; under context
parallelism each rank's ``seq_length / cp`` tokens of every sequence). Every pipeline
stage receives the same microbatches (stages only use what they need), so callers do
not special-case PP. The loss function returns the *sum* over tokens, the token count
and a dict of detached per-microbatch statistics; megatron-core divides by the global
token count (``calculate_per_token_loss``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch

from r1mega.training.policy import Policy

LossFn = Callable[[dict[str, torch.Tensor], torch.Tensor],
                  tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


def _forward_step(loss_fn: LossFn, model_forward: Callable[..., torch.Tensor],
                  data_iterator: Iterable[dict[str, torch.Tensor]], model: torch.nn.Module):
    batch = next(data_iterator)
    # Batches are built on the host; move them to the model's device in place (callers
    # read results their loss function stores back into the same dict).
    device = next(model.parameters()).device
    batch.update({k: v.to(device, non_blocking=True) for k, v in batch.items()
                  if isinstance(v, torch.Tensor) and v.device != device})
    output = model_forward(model, batch)
    return output, partial(loss_fn, batch)


def gpt_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run a GPTModel stage; on the last stage the output is the per-token LM loss when
    the batch carries labels, otherwise vocab-parallel logits ``[b, s, V/tp]``."""
    return model(
        input_ids=batch["tokens"],
        position_ids=batch["position_ids"],
        attention_mask=batch.get("attention_mask"),
        labels=batch.get("labels"),
        loss_mask=batch.get("loss_mask"),
    )


def forward_backward(policy: Policy, microbatches: list[dict[str, torch.Tensor]],
                     loss_fn: LossFn, forward_only: bool = False,
                     model_forward: Callable[..., torch.Tensor] = gpt_forward,
                     ) -> list[dict[str, torch.Tensor]]:
    """Run all microbatches forward (and backward) on this rank's stages.

    Returns the per-microbatch statistics dicts on the last pipeline stage (empty
    elsewhere). Gradients are finalized (DP/TP/PP reductions, token normalisation)
    by megatron-core's ``finalize_model_grads`` when not ``forward_only``; forward-only
    passes run without autograd.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not microbatches:
        raise ValueError("forward_backward needs at least one microbatch")
    from megatron.core import parallel_state as ps

    micro_batch_size, local_length = microbatches[0]["tokens"].shape
    # Under context parallelism microbatches hold this rank's share of each sequence;
    # megatron sizes pipeline buffers from the full length (and divides by CP itself).
    seq_length = local_length * ps.get_context_parallel_world_size()
    forward_backward_func = get_forward_backward_func()
    # megatron-core keeps autograd on in forward-only mode; without it a forward-only pass
    # keeps no activations and counts no tokens into MoE routers' expert-bias statistics
    # (those must only see the batches the updates train on).
    with torch.set_grad_enabled(not forward_only):
        return forward_backward_func(
            forward_step_func=partial(_forward_step, loss_fn, model_forward),
            data_iterator=iter(microbatches),
            model=policy.chunks,
            num_microbatches=len(microbatches),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )


def lm_loss(batch: dict[str, torch.Tensor], output: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Next-token cross-entropy: GPTModel already returns per-token losses ``[b, s]``."""
    mask = batch["loss_mask"].to(output.dtype)
    loss_sum = (output * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm_loss": torch.stack([loss_sum.detach(), mask.sum()])}
