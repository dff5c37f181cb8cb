"""The rollout engine: batched, KV-cached, continuously batched decoding of a megatron model.

Why not megatron-core's own engines (0.19.2)? Its ``StaticInferenceEngine`` decodes a fixed
batch in lock step: a finished response keeps its row until the longest one ends, which
for R1-style rollouts (lengths spread over an order of magnitude) wastes most of the
decode steps. Its ``DynamicInferenceEngine`` batches continuously but needs CUDA kernels
(flash attention with paged KV, Triton), so it cannot run on the CPU machines the project
must build and test on. This engine keeps megatron's pieces, the model's own static
KV-cache path (``StaticInferenceContext``) and ``InferenceMode`` (last-token logits,
gathered over TP), and adds on top (see :mod:`r1mega.rollout.kv_cache`):

* continuous batching: ``max_batch_size`` slots; when a response ends, the next waiting
  request is prefilled and takes its slot;
* sampling per request (temperature, top-k, top-p, a seed per request), stop on EOS or a
  stop string, ``max_new_tokens``, and the log-probability of every sampled token under
  the temperature-scaled distribution (what the trainer recomputes);
* lock step where the model needs it: with MoE, every rank of an expert-parallel group
  must run the same forward passes with the same token counts (the CPU ``allgather``
  dispatcher gathers equal shapes), so each round the ranks agree on its kind and shape
  with one small all-reduce and pad with dummy rows.

Each round is one forward pass: a *prefill* of waiting prompts, a *decode* of one token
for every live row, or (rarely) a *compaction* that re-prefills live rows when the shared
offset reaches the end of the cache.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from r1mega.rollout.kv_cache import CacheBuffers, decode_mask, prefill_mask
from r1mega.rollout.sampling import sample_tokens
from r1mega.rollout.types import GenerationRequest, Sample, SamplingParams


@dataclass
class _Row:
    """A request occupying a slot."""

    index: int  # position in the generate() call's request list
    request: GenerationRequest
    generator: torch.Generator
    start: int  # first cache position of its tokens
    response: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


@dataclass
class EngineStats:
    """What the last :meth:`GenerationEngine.generate` did."""

    requests: int = 0
    new_tokens: int = 0
    prefill_rounds: int = 0
    decode_rounds: int = 0
    compactions: int = 0
    max_live_rows: int = 0
    kv_cache_bytes: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


class StopStrings:
    """Detects stop strings in the decoded tail of a response.

    Checked after every token, so a stop string is caught by the token that completes it;
    only the last few tokens are decoded (enough bytes for the longest stop string).
    """

    def __init__(self, stops: Sequence[str], decode: Callable[[list[int]], str] | None) -> None:
        self.stops = [s for s in stops if s]
        if self.stops and decode is None:
            raise ValueError("stop strings need a decode function (the tokenizer's)")
        self.decode = decode
        self.window = max((len(s.encode()) for s in self.stops), default=0) + 1

    def hit(self, response: list[int]) -> bool:
        if not self.stops:
            return False
        tail = self.decode(response[-self.window:])
        return any(s in tail for s in self.stops)


class GenerationEngine:
    """Generates responses with a megatron GPTModel built for generation (one pipeline
    stage, its own process groups; see :func:`r1mega.models.build_generation_model`).

    Every rank of the model's TP group passes the same requests; ranks of different DP
    replicas pass their own. ``lockstep_group`` is the group whose ranks must run
    identical forward passes (``None``: the whole job, as MoE expert parallelism
    needs; the TP group suffices for dense models).
    """

    def __init__(self, model: torch.nn.Module, tp_group: Any, max_batch_size: int,
                 lockstep_group: Any = None, prefill_rows: int | None = None,
                 cache_length_factor: float = 2.0) -> None:
        if max_batch_size < 1:
            raise ValueError(f"rollout.max_batch_size={max_batch_size} must be >= 1")
        self.model = model
        self.tp_group = tp_group
        self.lockstep_group = lockstep_group
        self.max_batch_size = max_batch_size
        # Prompts prefilled per round once decoding runs (refills of freed slots; the
        # first fill uses every slot). A quarter of the slots by default: rows finish a
        # few at a time, and the scratch cache they are prefilled in costs memory.
        self.prefill_rows = max(1, min(prefill_rows or max_batch_size // 4, max_batch_size))
        self.cache_length_factor = cache_length_factor
        self.vocab_size = model.vocab_size
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.stats = EngineStats()

    # ------------------------------------------------------------------ public API

    @torch.no_grad()
    def generate(self, requests: Sequence[GenerationRequest], stop_strings: Sequence[str] = (),
                 decode: Callable[[list[int]], str] | None = None,
                 on_finish: Callable[[], None] | None = None) -> list[Sample]:
        """One response per request, in request order (collective over the lock-step
        group; a rank may pass no requests). ``on_finish`` is called as each response
        ends (progress reporting)."""
        from megatron.core.inference.utils import InferenceMode

        started = time.perf_counter()
        stops = StopStrings(stop_strings, decode)
        longest_prompt = max((len(r.prompt_ids) for r in requests), default=1)
        longest_new = max((r.params.max_new_tokens for r in requests), default=1)
        if any(not r.prompt_ids for r in requests):
            raise ValueError("every generation request needs a non-empty prompt")
        offset, longest_new, most = self._agree_max([longest_prompt, longest_new,
                                                      len(requests)])
        length = offset + int(longest_new * self.cache_length_factor) + 1
        self.stats = EngineStats(requests=len(requests))
        # No more slots than the busiest rank of the lock step has requests.
        slots = max(1, min(self.max_batch_size, most))
        run = _Run(self, requests, stops, offset, length, slots, on_finish)
        try:
            with InferenceMode.active():
                run.loop()
        finally:
            self.stats.kv_cache_bytes = run.cache_bytes()
            run.release()
        self.stats.seconds = time.perf_counter() - started
        self.stats.new_tokens = sum(len(s.response_ids) for s in run.results)
        return run.results

    # ------------------------------------------------------------------ helpers

    def _agree_max(self, values: list[int]) -> list[int]:
        """Element-wise maximum over the lock-step group."""
        t = torch.tensor(values, dtype=torch.long)
        if dist.is_initialized() and (self.lockstep_group is None
                                      or dist.get_world_size(self.lockstep_group) > 1):
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.lockstep_group)
        return t.tolist()

    def forward(self, tokens: torch.Tensor, context: Any, mask: torch.Tensor) -> torch.Tensor:
        """Last-position logits ``[b, V]`` (fp32, full vocabulary) for ``tokens`` written
        into ``context`` at its offset."""
        offset = context.sequence_len_offset
        positions = torch.arange(offset, offset + tokens.shape[1], device=self.device)
        logits = self.model(input_ids=tokens.to(self.device),
                            position_ids=positions.expand(tokens.shape[0], -1),
                            attention_mask=mask.to(self.device), inference_context=context,
                            runtime_gather_output=True)
        return logits[:, -1, :self.vocab_size].float()

    def sample(self, logits: torch.Tensor, rows: list[_Row | None]) -> tuple[list[int],
                                                                                list[float]]:
        """One token (and its log-probability) per row; ``None`` rows are padding.

        Rows with equal sampling settings are sampled together, each with its own
        generator. TP ranks hold identical logits and generators; the tokens of TP rank 0
        are broadcast anyway so the replicas can never drift apart.
        """
        tokens = torch.zeros(len(rows), dtype=torch.long)
        logprobs = torch.zeros(len(rows), dtype=torch.float32)
        by_params: dict[tuple[float, int, float], list[int]] = {}
        for i, row in enumerate(rows):
            if row is not None:
                p = row.request.params
                by_params.setdefault((p.temperature, p.top_k, p.top_p), []).append(i)
        for (temperature, top_k, top_p), members in by_params.items():
            picked, logp = sample_tokens(logits[members].cpu(), temperature, top_k, top_p,
                                         [rows[i].generator for i in members])
            tokens[members], logprobs[members] = picked, logp
        if dist.is_initialized() and dist.get_world_size(self.tp_group) > 1:
            src = dist.get_global_rank(self.tp_group, 0)
            dist.broadcast(tokens, src=src, group=self.tp_group)
            dist.broadcast(logprobs, src=src, group=self.tp_group)
        return tokens.tolist(), logprobs.tolist()


class _Run:
    """The state of one :meth:`GenerationEngine.generate` call."""

    def __init__(self, engine: GenerationEngine, requests: Sequence[GenerationRequest],
                 stops: StopStrings, offset: int, length: int, slots: int,
                 on_finish: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self.on_finish = on_finish
        self.requests = requests
        self.stops = stops
        self.offset = offset  # next cache position to write; shared by all slots
        self.length = length
        self.queue = deque(range(len(requests)))
        self.slots: list[_Row | None] = [None] * slots
        self.prefill_rows = min(engine.prefill_rows, slots)
        self.results: list[Sample] = [None] * len(requests)  # type: ignore[list-item]
        self.main = CacheBuffers(engine.model, slots, length, engine.dtype, engine.device)
        self._scratch: CacheBuffers | None = None  # only once a freed slot is refilled
        self.first_fill = True

    @property
    def scratch(self) -> CacheBuffers:
        if self._scratch is None:
            self._scratch = CacheBuffers(self.engine.model, self.prefill_rows, self.length,
                                         self.engine.dtype, self.engine.device)
        return self._scratch

    def cache_bytes(self) -> int:
        return self.main.nbytes() + (self._scratch.nbytes() if self._scratch else 0)

    def release(self) -> None:
        self.main.release()
        if self._scratch is not None:
            self._scratch.release()

    # ------------------------------------------------------------------ rounds

    def loop(self) -> None:
        engine = self.engine
        while True:
            free = [s for s, row in enumerate(self.slots) if row is None]
            capacity = len(self.slots) if self.first_fill else self.prefill_rows
            refill = min(len(free), len(self.queue), capacity)
            widest = max((len(self.requests[self.queue[i]].prompt_ids) for i in range(refill)),
                         default=0)
            live = [s for s, row in enumerate(self.slots) if row is not None]
            rows = live[-1] + 1 if live else 0
            compact = int(bool(live) and self.offset >= self.length)
            refill, widest, rows, compact, work = engine._agree_max(
                [refill, widest, rows, compact, int(bool(live or self.queue))])
            if not work:
                return
            if compact:
                self._compact()
            elif refill:
                self._prefill(refill, widest)
            else:
                self._decode(rows)
            engine.stats.max_live_rows = max(engine.stats.max_live_rows,
                                             sum(r is not None for r in self.slots))

    def _prefill(self, count: int, width: int) -> None:
        """Prefill up to ``count`` waiting prompts right-aligned at the shared offset and
        sample their first tokens. The first fill writes straight into the slots; later
        ones go through the scratch buffers and are copied into free slots."""
        engine = self.engine
        free = [s for s, row in enumerate(self.slots) if row is None]
        mine = min(len(free), len(self.queue), count)
        base = self.offset - width
        starts, tokens = [], torch.zeros(count, width, dtype=torch.long)
        new_rows: list[_Row | None] = []
        for i in range(count):
            if i < mine:
                index = self.queue.popleft()
                request = self.requests[index]
                prompt = request.prompt_ids
                tokens[i, width - len(prompt):] = torch.tensor(prompt)
                starts.append(self.offset - len(prompt))
                new_rows.append(_Row(index=index, request=request, start=starts[-1],
                                     generator=torch.Generator().manual_seed(request.seed)))
            else:  # padding row of the lock step: attends to its own (dummy) tokens
                tokens[i].fill_(0)
                starts.append(base)
                new_rows.append(None)
        target = self.main if self.first_fill else self.scratch
        mask = prefill_mask(starts, base, width, engine.device)
        logits = engine.forward(tokens, target.at(base), mask)
        if not self.first_fill:
            self.scratch.copy_rows_to(self.main, list(range(mine)), free[:mine], base,
                                      self.offset)
            placed = free[:mine]
        else:
            placed = list(range(mine))
        self.first_fill = False
        engine.stats.prefill_rounds += 1
        picked, logps = engine.sample(logits, new_rows)
        for slot, row, token, logp in zip(placed, new_rows, picked, logps, strict=False):
            self.slots[slot] = row
            self._append(slot, token, logp)

    def _decode(self, rows: int) -> None:
        """Feed every live row's latest token at the shared offset; sample the next."""
        engine = self.engine
        tokens = torch.zeros(rows, 1, dtype=torch.long)
        starts = []
        batch: list[_Row | None] = []
        for slot in range(rows):
            row = self.slots[slot]
            batch.append(row)
            if row is None:
                starts.append(self.offset)  # a free slot: attend to itself only
            else:
                tokens[slot, 0] = row.response[-1]
                starts.append(row.start)
        logits = engine.forward(tokens, self.main.at(self.offset),
                                decode_mask(starts, self.offset, engine.device))
        self.offset += 1
        engine.stats.decode_rounds += 1
        picked, logps = engine.sample(logits, batch)
        for slot, row in enumerate(batch):
            if row is not None:
                self._append(slot, picked[slot], logps[slot])

    def _compact(self) -> None:
        """Re-prefill every live row from position 0 (prompt + response so far, except
        the newest token, which the next decode feeds) so the cache has room again."""
        engine = self.engine
        histories = []
        for row in self.slots:
            histories.append(None if row is None
                             else row.request.prompt_ids + row.response[:-1])
        waiting = max((len(self.requests[i].prompt_ids) for i in self.queue), default=0)
        longest = max([len(h) for h in histories if h is not None] + [waiting, 1])
        (width,) = engine._agree_max([longest])
        tokens = torch.zeros(len(self.slots), width, dtype=torch.long)
        starts = []
        for slot, history in enumerate(histories):
            if history is None:
                starts.append(0)
                continue
            tokens[slot, width - len(history):] = torch.tensor(history)
            starts.append(width - len(history))
            self.slots[slot].start = starts[-1]
        engine.forward(tokens, self.main.at(0), prefill_mask(starts, 0, width, engine.device))
        self.offset = width
        engine.stats.compactions += 1

    # ------------------------------------------------------------------ bookkeeping

    def _append(self, slot: int, token: int, logprob: float) -> None:
        row = self.slots[slot]
        row.response.append(token)
        row.logprobs.append(logprob)
        params: SamplingParams = row.request.params
        reason = None
        if params.eos_id is not None and token == params.eos_id:
            reason = "eos"
        elif self.stops.hit(row.response):
            reason = "stop"
        elif len(row.response) >= params.max_new_tokens:
            reason = "length"
        if reason is None:
            return
        self.results[row.index] = Sample(
            prompt_ids=list(row.request.prompt_ids), response_ids=row.response,
            logprobs=row.logprobs, finished=reason != "length", stop_reason=reason)
        self.slots[slot] = None
        if self.on_finish is not None:
            self.on_finish()
