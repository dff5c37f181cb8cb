"""A sampling backend for megatron's dynamic inference engine with a generator per request.

megatron-core 0.19.2's ``TextGenerationController`` draws every token of every request
from one engine-wide generator, so a response would depend on which requests happened to
share its steps. RL needs the opposite: a sample is a function of its prompt, the
weights and its own seed, whatever its neighbours, slot, generation layout or DP size.
:class:`SeededSampling` replaces the controller's backend (megatron's ``Sampling``
interface): each request owns a ``torch.Generator`` seeded from its request seed, and
rows are sampled with :func:`r1mega.rollout.sampling.sample_tokens` (temperature, top-k
and top-p, also together). Its log-probabilities are those of the temperature-scaled,
untruncated distribution (what the trainer recomputes), through megatron's
``processed_logprobs`` path.

Two more rules keep the random streams independent of scheduling:

* the chunk of a prompt prefilled in pieces (chunked prefill) produces a token megatron
  discards; it is taken greedily, so it never consumes a draw from the generator;
* TP ranks hold identical logits and generators; the tokens of TP rank 0 are broadcast
  anyway so replicas cannot drift apart.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.inference.sampling.base import Sampling

from r1mega.rollout.sampling import sample_tokens, temperature_logprobs
from r1mega.rollout.types import SamplingParams


class SeededSampling(Sampling):
    """megatron ``Sampling`` backend with one generator per request (see module doc)."""

    def __init__(self, tp_group: Any = None) -> None:
        self.tp_group = tp_group
        self._tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
        self._params: dict[int, SamplingParams] = {}
        self._generators: dict[int, torch.Generator] = {}
        self.last_tokens: dict[int, int] = {}  # request id -> token sampled this step

    def register(self, request_id: int, params: SamplingParams, seed: int) -> None:
        self._params[request_id] = params
        self._generators[request_id] = torch.Generator().manual_seed(seed)

    def clear(self) -> None:
        self._params.clear()
        self._generators.clear()
        self.last_tokens.clear()

    @staticmethod
    def _row_request_ids(context: Any, rows: int) -> list[int]:
        start = context.paused_request_count
        return context.request_ids[start:start + rows].tolist()

    def sample_kernel(self, logits: torch.Tensor, n: int, context: Any, *, no_top_k: bool,
                      no_top_p: bool, gather_indices: torch.Tensor | None = None,
                      token_to_request_index: torch.Tensor | None = None,
                      output: torch.Tensor | None = None, eager: bool = False,
                      cache_key: Any = None) -> torch.Tensor:
        if token_to_request_index is not None:
            raise NotImplementedError("speculative decoding is not supported by the rollout")
        if gather_indices is not None:
            logits = logits[gather_indices[:n]]
        logits = logits[:n].float().cpu()
        ids = self._row_request_ids(context, n)
        partial = context.chunked_prefill_request_id
        tokens = torch.zeros(n, dtype=torch.long)
        buckets: dict[tuple[float, int, float], list[int]] = defaultdict(list)
        for row, request_id in enumerate(ids):
            if request_id == partial:
                tokens[row] = logits[row].argmax()  # discarded by megatron; no draw
                continue
            p = self._params[request_id]
            buckets[(p.temperature, p.top_k, p.top_p)].append(row)
        for (temperature, top_k, top_p), rows in buckets.items():
            picked, _ = sample_tokens(logits[rows], temperature, top_k, top_p,
                                      [self._generators[ids[r]] for r in rows])
            tokens[rows] = picked
        if self._tp_size > 1:
            dist.broadcast(tokens, src=dist.get_global_rank(self.tp_group, 0),
                           group=self.tp_group)
        self.last_tokens = dict(zip(ids, tokens.tolist(), strict=True))
        if output is None:
            output = torch.empty(n, dtype=torch.long, device=logits.device)
        output[:n] = tokens.to(output.device)
        return output

    def log_probs_kernel(self, logits: torch.Tensor, context: Any, *,
                         token_to_request_index: torch.Tensor | None = None) -> torch.Tensor:
        rows = logits.shape[0]
        ids = self._row_request_ids(context, context.total_request_count
                                    - context.paused_request_count)
        if token_to_request_index is not None:
            ids = [ids[i] for i in token_to_request_index.tolist()]
        temperatures = [self._params[i].temperature if i in self._params else 1.0
                         for i in ids[:rows]]
        out = torch.empty(rows, logits.shape[-1], dtype=torch.float32, device=logits.device)
        for temperature in set(temperatures):
            index = torch.tensor([r for r, t in enumerate(temperatures) if t == temperature],
                                 device=logits.device)
            out[index] = temperature_logprobs(logits[index], temperature)
        return out
