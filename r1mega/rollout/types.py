"""What a rollout asks for and what it returns, shared by every sampler."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one response. ``temperature == 0`` is greedy; ``top_k == 0`` and
    ``top_p == 1`` switch those filters off."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    eos_id: int | None = None
    pad_id: int = 0


@dataclass(frozen=True)
class GenerationRequest:
    """One response to sample. ``seed`` alone determines the random draws, so a request's
    response does not depend on its batch neighbours, its slot or the layout."""

    prompt_ids: list[int]
    params: SamplingParams
    seed: int


@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]  # of each response token, under the sampling temperature
    finished: bool  # stopped by EOS or a stop string (False: ran out of max_new_tokens)
    stop_reason: str = "length"  # eos | stop | length
    # MoE experts chosen per token when the rollout records routing (routing replay):
    # int16 [len(prompt_ids) + len(response_ids) - 1, moe_layers, topk], row j for the
    # model's input token j (the last response token is never an input).
    routing: torch.Tensor | None = None
