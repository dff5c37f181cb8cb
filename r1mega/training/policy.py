"""The trainable policy: model chunks wrapped for data parallelism.

megatron-core's ``DistributedDataParallel`` keeps gradients in contiguous fp32 buffers
(``param.main_grad``) that its optimizers (including the distributed optimizer) read;
``finalize_model_grads`` then reduces them across DP, sums sequence-parallel norm grads
across TP, ties embedding grads across pipeline stages and divides by the number of
loss tokens in the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from r1mega.models import build_model, build_transformer_config


@dataclass
class Policy:
    """This rank's model chunks (one per virtual pipeline stage; one here)."""

    chunks: list[torch.nn.Module]
    config: Any  # megatron TransformerConfig shared by the chunks

    def zero_grad(self) -> None:
        for chunk in self.chunks:
            chunk.zero_grad_buffer()

    def unwrapped(self) -> list[torch.nn.Module]:
        """The bare GPTModels under the DDP wrappers."""
        return [chunk.module for chunk in self.chunks]


def build_policy(model_cfg: Any, layout_cfg: Any, precision: Any | None = None,
                 recompute: str | None = None, use_distributed_optimizer: bool = False) -> Policy:
    """Build this rank's stage of the policy wrapped in megatron's DDP.

    ``calculate_per_token_loss`` is on: losses are token sums and the global token
    count divides the gradients, so any split of a batch over microbatches and DP
    ranks produces the gradient of the same global per-token mean.
    """
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    model = build_model(model_cfg, layout_cfg, precision, recompute)
    config = model.config
    config.calculate_per_token_loss = True
    config.finalize_model_grads_func = finalize_model_grads
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=True,
    )
    wrapped = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    return Policy(chunks=[wrapped], config=config)


__all__ = ["Policy", "build_policy", "build_transformer_config"]
