"""A reward model: the policy's transformer with a scalar head instead of the LM head.

DeepSeek-R1's second RL stage scores general (non-verifiable) prompts with a reward
model. Reward models are ordinarily released as Hugging Face ``*ForSequenceClassification``
checkpoints with one label: the decoder, its final norm and a ``score`` projection from
the hidden size to one value, read at the last token of the sequence. Here that is a
megatron ``GPTModel`` without its output stage (``post_process=False``: no final norm, no
vocabulary projection) plus :class:`RewardHead` on the last pipeline stage, so the model
runs at the same TP/PP/EP layouts, loads from distributed checkpoints and converts from
HF like the policy (``model.head: scalar``; see ``r1mega/convert``).
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.models.gpt import GPTModel


class RewardHead(torch.nn.Module):
    """Final RMSNorm and the ``hidden -> 1`` score projection (replicated over TP)."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=dtype)
        self.score = torch.nn.Linear(hidden_size, 1, bias=False, dtype=dtype)
        torch.nn.init.normal_(self.score.weight, std=0.02)

    def forward(self, last_hidden: torch.Tensor) -> torch.Tensor:
        return self.score(self.norm(last_hidden)).squeeze(-1)


class RewardModel(GPTModel):
    """``GPTModel`` whose last stage returns one score per row.

    ``forward`` takes ``lengths`` (``[b]``, the number of real tokens of each right-padded
    row): the score is read at position ``lengths - 1``, the last real token, as the HF
    sequence-classification models do.
    """

    def __init__(self, *args: Any, last_stage: bool, **kwargs: Any) -> None:
        kwargs["post_process"] = False  # no final norm / vocabulary projection in the block
        kwargs["share_embeddings_and_output_weights"] = False
        super().__init__(*args, **kwargs)
        self.last_stage = last_stage
        if last_stage:
            self.head = RewardHead(self.config.hidden_size, self.config.layernorm_epsilon,
                                   self.config.params_dtype)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        hidden = super().forward(input_ids=input_ids, position_ids=position_ids,
                                 attention_mask=attention_mask, **kwargs)
        if not self.last_stage:
            return hidden
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        if self.config.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, group=self.pg_collection.tp)
        hidden = hidden.transpose(0, 1)  # [b, s, h]
        if lengths is None:
            lengths = torch.full((hidden.shape[0],), hidden.shape[1], device=hidden.device)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.head(hidden[rows, lengths.to(hidden.device) - 1]).float()
