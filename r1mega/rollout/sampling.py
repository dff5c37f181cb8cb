"""Token sampling from full-vocabulary logits: temperature, top-k, top-p, seeded."""

from __future__ import annotations

import torch


def sample_tokens(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                  generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of ``logits`` ``[b, V]``.

    Returns (tokens ``[b]``, log-probabilities of the sampled tokens under the
    temperature-scaled, *untruncated* distribution ``[b]``; this is what the trainer
    recomputes, so the two are comparable). ``temperature == 0`` is greedy. Each row has
    its own generator, so a request's samples do not depend on its batch neighbours.
    """
    logits = logits.float()
    logprobs = temperature_logprobs(logits, temperature)
    if temperature == 0.0:
        tokens = logits.argmax(dim=-1)
        return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]
    scaled = logits / temperature
    filtered = scaled.clone()
    if top_k and top_k < filtered.shape[-1]:
        kth = torch.topk(filtered, top_k, dim=-1).values[:, -1:]
        filtered[filtered < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(filtered, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        remove = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p
        sorted_logits[remove] = float("-inf")
        filtered = torch.full_like(filtered, float("-inf")).scatter(-1, order, sorted_logits)
    # Inverse-CDF sampling: one uniform draw from each row's own generator (a per-row
    # torch.multinomial call costs ~10x more).
    cumulative = torch.softmax(filtered, dim=-1).cumsum(dim=-1)
    uniform = torch.stack([torch.rand((), generator=g) for g in generators])
    targets = (uniform * cumulative[:, -1])[:, None]
    tokens = torch.searchsorted(cumulative, targets, right=True)[:, 0]
    tokens = tokens.clamp_max(cumulative.shape[-1] - 1)
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]


def temperature_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax of ``logits / temperature`` (plain log softmax when greedy): the
    distribution whose log-probabilities the rollout returns and the trainer recomputes."""
    logits = logits.float()
    return torch.log_softmax(logits / temperature if temperature > 0 else logits, dim=-1)
