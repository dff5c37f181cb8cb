"""The rollout engine: megatron-core's dynamic inference engine, driven for RL.

megatron-core 0.19.2's ``DynamicInferenceEngine`` + ``DynamicInferenceContext`` +
``TextGenerationController`` decode with a paged KV cache (fixed-size blocks handed to
requests as they grow), continuous batching (requests join and leave every step),
chunked prefill (long prompts prefilled in pieces within a per-step token budget),
prefix caching (requests whose prompts share whole blocks share those blocks' KV, so
the ``group_size`` samples of a GRPO prompt prefill it once), MLA's latent cache
(``cache_mla_latents``: one ``kv_lora_rank + rope`` vector per token instead of
per-head keys and values) and suspend/resume of the KV memory. The same code runs on GPU
(flash-attention / FlashMLA kernels) and on CPU (the torch paged attention of
:mod:`parallel.platform`).

:class:`RolloutEngine` adds what RL needs on top, without forking megatron's loop:

* **seeds per request** (:class:`r1mega.rollout.seeded_sampling.SeededSampling` as the
  controller's sampling backend), so a sample never depends on its neighbours, its slot,
  the generation layout or the DP size;
* **string-level stop strings**: megatron matches token-id suffixes only; here each
  step's new token is checked on decoded text through the controller's stop callback,
  which ends the request in the same step;
* **log-probabilities** of every sampled token under the temperature-scaled distribution
  (megatron's ``processed_logprobs`` mode, computed by the seeded backend);
* **lock step**: with MoE, the ranks of an expert-parallel group must run the same
  number of forward passes; each step the lock-step group agrees whether anyone has work
  (one all-reduce), and a rank without work runs megatron's ``dummy_forward``;
* **no stale KV**: megatron's prefix cache is keyed by token ids only; every
  :meth:`generate` starts from an empty cache (``reset``), so KV computed with earlier
  weights can never be reused after a refit;
* **memory**: :meth:`suspend` frees the KV buffer while the trainer runs and
  :meth:`generate` resumes it; :meth:`reserve` (called by :meth:`generate` with what its
  requests need) rebuilds the context when a longer generation budget arrives (a
  response-length schedule), growing in powers of two so a growing budget rebuilds
  rarely;
* **MoE routing record** (optional): the experts chosen for every token during the
  rollout, returned per sample for routing replay in the training forward.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from r1mega.rollout import kv_footprint
from r1mega.rollout.seeded_sampling import SeededSampling
from r1mega.rollout.types import GenerationRequest, Sample


@dataclass(frozen=True)
class EngineSettings:
    """How the engine sizes itself (``rollout.*`` config keys)."""

    max_requests: int  # max_batch_size: requests decoded together per replica
    max_tokens_per_step: int = 2048  # tokens per forward pass (chunked prefill budget)
    block_tokens: int | None = None  # KV block size; None: 64 for MLA, 256 otherwise
    kv_cache_gib: float | None = None  # KV buffer; None: max_requests full-length sequences
    prefix_caching: bool = True
    chunked_prefill: bool = True
    record_routing: bool = False  # MoE experts per token, for routing replay

    @classmethod
    def from_config(cls, rollout_cfg: Any) -> EngineSettings:
        return cls(max_requests=rollout_cfg.max_batch_size,
                   max_tokens_per_step=rollout_cfg.max_tokens_per_step,
                   block_tokens=rollout_cfg.kv_block_tokens,
                   kv_cache_gib=rollout_cfg.kv_cache_gib,
                   prefix_caching=rollout_cfg.prefix_caching,
                   chunked_prefill=rollout_cfg.chunked_prefill,
                   record_routing=rollout_cfg.routing_replay)


@dataclass
class EngineStats:
    """What the last :meth:`RolloutEngine.generate` did (this rank)."""

    requests: int = 0
    new_tokens: int = 0
    steps: int = 0  # forward passes with work
    dummy_steps: int = 0  # lock-step forward passes without work
    chunked_prefill_steps: int = 0  # steps that prefilled part of a prompt
    prompt_tokens: int = 0
    prefill_tokens_computed: int = 0  # prompt tokens run through the model
    prefill_tokens_skipped: int = 0  # prompt tokens whose KV came from the prefix cache
    prefix_cache_hits: int = 0  # requests that reused at least one cached block
    max_active_requests: int = 0
    peak_kv_blocks: int = 0  # most KV blocks in use at once
    kv_cache_bytes: int = 0  # size of the KV buffer
    kv_bytes_per_token: int = 0
    context_builds: int = 0  # context (re)allocations so far (grows with the budget)
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_metrics(self, prefix: str = "rollout/") -> dict[str, float]:
        skipped = self.prefill_tokens_skipped
        total = self.prefill_tokens_computed + skipped
        return {
            f"{prefix}decode_tokens_per_s": self.tokens_per_s,
            f"{prefix}engine_steps": float(self.steps),
            f"{prefix}dummy_steps": float(self.dummy_steps),
            f"{prefix}max_active_requests": float(self.max_active_requests),
            f"{prefix}prefix_cache_hits": float(self.prefix_cache_hits),
            f"{prefix}prefill_skipped_frac": skipped / total if total else 0.0,
            f"{prefix}kv_peak_blocks": float(self.peak_kv_blocks),
            f"{prefix}kv_cache_gib": self.kv_cache_bytes / 1024**3,
        }


def _drop_inference_scratch() -> None:
    """Forget megatron's shared scratch buffers that generation allocated.

    megatron's global memory buffer (the all-gather scratch of sequence parallelism, ...)
    is one per process, shared by the generation and the training model. A buffer first
    allocated while megatron's engine runs under ``torch.inference_mode`` is an inference
    tensor, which the training forward's in-place all-gather may not write ("Inplace
    update to inference tensor outside InferenceMode"); dropping them lets training
    allocate its own (a training-allocated buffer serves generation as it is)."""
    from megatron.core import parallel_state as ps

    try:
        scratch = ps.get_global_memory_buffer().buffer
    except AssertionError:  # megatron's parallel state is not initialised
        return
    for key in [k for k, t in scratch.items() if t.is_inference()]:
        del scratch[key]


def kv_bytes_per_token(config: Any, tp_size: int) -> int:
    """KV-cache bytes one token occupies across all layers on one rank for a megatron
    ``TransformerConfig`` (:mod:`r1mega.rollout.kv_footprint` has the rule, which the
    planner shares)."""
    mla = bool(getattr(config, "cache_mla_latents", False))
    return kv_footprint.kv_bytes_per_token(
        layers=config.num_layers, tp=tp_size, mla=mla,
        dtype_bytes=torch.empty((), dtype=config.params_dtype).element_size(),
        kv_lora_rank=getattr(config, "kv_lora_rank", 0) or 0,
        rope_dim=getattr(config, "qk_pos_emb_head_dim", 0) or 0,
        query_groups=config.num_query_groups or config.num_attention_heads,
        head_dim=config.kv_channels)


class _SilentTokenizer:
    """What megatron's engine asks of a tokenizer once a request ends (it detokenizes for
    its own records): the rollout decodes nothing there, samples carry token ids."""

    eod = -1

    def detokenize(self, tokens: list[int], **_: Any) -> str:
        return ""

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError("the rollout engine takes token ids, not text")


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

    def __bool__(self) -> bool:
        return bool(self.stops)

    def hit(self, response: list[int]) -> bool:
        if not self.stops:
            return False
        tail = self.decode(response[-self.window:])
        return any(s in tail for s in self.stops)


@dataclass
class _Call:
    """The bookkeeping of one :meth:`RolloutEngine.generate` call."""

    requests: Sequence[GenerationRequest]
    stops: StopStrings
    on_finish: Callable[[], None] | None
    stopped: set[int] = field(default_factory=set)
    results: dict[int, Sample] = field(default_factory=dict)


class RolloutEngine:
    """Generates responses with a megatron GPTModel built for generation (one pipeline
    stage, process groups of its own; see :func:`r1mega.models.build_generation_model`).

    Every rank of the model's TP group passes the same requests; ranks of different DP
    replicas pass their own. ``lockstep_group`` is the group whose ranks must run the
    same number of forward passes (``None``: the whole job, as MoE expert parallelism
    needs; a dense model's TP ranks share their requests, so its TP group suffices).
    """

    def __init__(self, model: torch.nn.Module, pg_collection: Any, settings: EngineSettings,
                 lockstep_group: Any = None) -> None:
        from parallel.upstream_fixes import apply_upstream_fixes

        apply_upstream_fixes()
        if settings.max_requests < 1:
            raise ValueError(f"rollout.max_batch_size={settings.max_requests} must be >= 1")
        self.model = model
        self.pg_collection = pg_collection
        self.settings = settings
        self.lockstep_group = lockstep_group
        self._lockstep_size = dist.get_world_size(lockstep_group) if dist.is_initialized() \
            else 1
        self.config = model.config
        self.tp_size = dist.get_world_size(pg_collection.tp) if dist.is_initialized() else 1
        mla = getattr(self.config, "cache_mla_latents", False)
        self.block_tokens = kv_footprint.block_tokens(mla, settings.block_tokens)
        if mla and self.block_tokens != kv_footprint.MLA_BLOCK_TOKENS:
            raise ValueError(f"rollout.kv_block_tokens={self.block_tokens}: MLA's latent "
                             f"cache needs {kv_footprint.MLA_BLOCK_TOKENS}-token blocks")
        # megatron pads requests per step to multiples of the TP size.
        self.max_requests = -(-settings.max_requests // self.tp_size) * self.tp_size
        # megatron pads a step's tokens to multiples of its TOKEN_ROUNDER (64 on GPU), so
        # the per-step token budget must be one too.
        from megatron.core.inference.contexts.dynamic_context import DynamicInferenceContext

        self.max_tokens = DynamicInferenceContext.round_up_tokens(
            max(settings.max_tokens_per_step, self.max_requests), self.tp_size)
        self.sampling = SeededSampling(pg_collection.tp)
        self.bytes_per_token = kv_bytes_per_token(self.config, self.tp_size)
        self.capacity = 0  # max sequence length (prompt + response) of the current context
        self._buffer_bytes = 0  # its KV buffer
        self._engine: Any = None
        self._router_replays: list[Any] = []
        self._next_request_id = 0
        self._call: _Call | None = None
        self.context_builds = 0
        self.stats = EngineStats()

    # ------------------------------------------------------------------ sizing

    def reserve(self, max_sequence_length: int, requests: int) -> None:
        """Make room for ``requests`` sequences of up to ``max_sequence_length`` tokens
        (prompt + response): rebuild the context when its maximum length is shorter or
        (without ``rollout.kv_cache_gib``) its KV buffer cannot hold them all at full
        length. The maximum length grows to the next power of two in blocks, the buffer
        to what is asked. :meth:`generate` calls it with what its requests need, so a
        growing response budget needs nothing from the caller. Collective over the
        lock-step group when it rebuilds (pass the group's agreed maxima)."""
        requests = max(1, min(requests, self.max_requests))
        buffer = kv_footprint.kv_buffer_bytes(
            bytes_per_token=self.bytes_per_token, block=self.block_tokens,
            max_sequence_length=max_sequence_length, requests=requests,
            kv_cache_gib=self.settings.kv_cache_gib)
        if (self._engine is not None and max_sequence_length <= self.capacity
                and buffer <= self._buffer_bytes):
            return
        self._build(kv_footprint.capacity_for(max_sequence_length, self.block_tokens),
                    max(buffer, self._buffer_bytes if self._engine is not None else 0))

    def _build(self, capacity: int, buffer_bytes: int) -> None:
        from megatron.core.inference.config import (
            InferenceConfig,
            KVCacheManagementMode,
            PrefixCachingEvictionPolicy,
        )
        from megatron.core.inference.contexts.dynamic_context import DynamicInferenceContext
        from megatron.core.inference.engines.dynamic_engine import DynamicInferenceEngine
        from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import (
            GPTInferenceWrapper,
        )
        from megatron.core.inference.text_generation_controllers.text_generation_controller import (
            TextGenerationController,
        )

        self.release()
        inference_config = InferenceConfig(
            block_size_tokens=self.block_tokens,
            buffer_size_gb=buffer_bytes / 1024**3,
            max_requests=self.max_requests,
            max_tokens=self.max_tokens,
            max_sequence_length=capacity,
            pg_collection=self.pg_collection,
            materialize_only_last_token_logits=True,
            enable_chunked_prefill=self.settings.chunked_prefill,
            enable_prefix_caching=self.settings.prefix_caching,
            # Blocks of finished requests stay cached until space is needed: a group's
            # later samples reuse its prompt even after the first ones have finished.
            prefix_caching_eviction_policy=PrefixCachingEvictionPolicy.LRU,
            kv_cache_management_mode=KVCacheManagementMode.RECOMPUTE,
            logprobs_mode="processed_logprobs",
            offset_sampling_seed_by_dp_rank=False,
        )
        context = DynamicInferenceContext(self.config, inference_config)
        wrapper = GPTInferenceWrapper(self.model, context)
        controller = TextGenerationController(wrapper, _SilentTokenizer())
        controller._sampling = self.sampling
        self._engine = DynamicInferenceEngine(controller, context)
        controller.set_stop_word_finished_ids_callback(self._stop_string_hits)
        self._router_replays = self._model_router_replays()
        self.capacity = capacity
        self._buffer_bytes = buffer_bytes
        self.context_builds += 1

    def _model_router_replays(self) -> list[Any]:
        """This model's routing recorders, in layer order (megatron keeps one process-wide
        list; it is pointed at this model's while this engine generates)."""
        if not self.settings.record_routing:
            return []
        from megatron.core.transformer.moe.router import TopKRouter

        return [m.router_replay for m in self.model.modules()
                if isinstance(m, TopKRouter) and m.router_replay is not None]

    # ------------------------------------------------------------------ memory

    def suspend(self) -> None:
        """Free the KV buffer (training runs next); :meth:`generate` resumes it."""
        if self._engine is not None:
            self._engine.suspend()
        _drop_inference_scratch()

    def release(self) -> None:
        """Drop the context and its buffers entirely (a rebuild follows)."""
        if self._engine is not None:
            self._engine.suspend()
            self._engine = None
            self.capacity = 0

    def resident_kv_bytes(self) -> int:
        """KV bytes held now (zero while suspended)."""
        from megatron.core.inference.engines.dynamic_engine import EngineState

        if self._engine is None or self._engine.state == EngineState.SUSPENDED:
            return 0
        buffer = getattr(self._engine.context, "memory_buffer", None)
        return buffer.numel() * buffer.element_size() if buffer is not None else 0

    # ------------------------------------------------------------------ generation

    def _agree_max(self, values: list[int]) -> list[int]:
        if self._lockstep_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.lockstep_group)
        return t.tolist()

    @torch.no_grad()
    def generate(self, requests: Sequence[GenerationRequest], stop_strings: Sequence[str] = (),
                 decode: Callable[[list[int]], str] | None = None,
                 on_finish: Callable[[], None] | None = None) -> list[Sample]:
        """One response per request, in request order (collective over the lock-step
        group; a rank may pass no requests). ``on_finish`` is called as each response
        ends (progress reporting). Starts from an empty KV cache: the weights may have
        changed since the last call."""
        from megatron.core.inference.sampling_params import SamplingParams as MegatronParams

        started = time.perf_counter()
        if any(not r.prompt_ids for r in requests):
            raise ValueError("every generation request needs a non-empty prompt")
        longest = max((len(r.prompt_ids) + r.params.max_new_tokens for r in requests),
                      default=1)
        longest, most = self._agree_max([longest, len(requests)])
        self.reserve(longest, most)
        engine = self._engine
        engine.resume()
        engine.reset()  # empty prefix cache: KV from earlier weights is never reused
        self.sampling.clear()
        self._install_router_replays()
        call = _Call(requests=requests, stops=StopStrings(stop_strings, decode),
                     on_finish=on_finish)
        self._call = call
        ids: dict[int, int] = {}
        for index, request in enumerate(requests):
            request_id = self._next_request_id
            self._next_request_id += 1
            ids[request_id] = index
            p = request.params
            self.sampling.register(request_id, p, request.seed)
            engine.add_request(request_id, list(request.prompt_ids), MegatronParams(
                num_tokens_to_generate=p.max_new_tokens,
                termination_id=p.eos_id if p.eos_id is not None else -1,
                return_log_probs=True, skip_prompt_log_probs=True))
        self.stats = EngineStats(requests=len(requests), context_builds=self.context_builds,
                                 prompt_tokens=sum(len(r.prompt_ids) for r in requests),
                                 kv_cache_bytes=self.resident_kv_bytes(),
                                 kv_bytes_per_token=self.bytes_per_token)
        try:
            self._loop(ids, call)
        finally:
            self._call = None
        self.stats.prefill_tokens_computed = engine._prefill_tokens_computed
        self.stats.prefill_tokens_skipped = engine._prefill_tokens_skipped
        self.stats.prefix_cache_hits = engine._prefix_cache_hits
        if not self.settings.prefix_caching:
            self.stats.prefill_tokens_computed = self.stats.prompt_tokens
        self.stats.seconds = time.perf_counter() - started
        self.stats.new_tokens = sum(len(s.response_ids) for s in call.results.values())
        return [call.results[i] for i in range(len(requests))]

    def _loop(self, ids: dict[int, int], call: _Call) -> None:
        engine = self._engine
        context = engine.context
        allocator = context.kv_block_allocator
        while True:
            mine = int(engine.has_unfinished_requests())
            (anyone,) = self._agree_max([mine])
            if not anyone:
                return
            if not mine:
                engine.controller.dummy_forward()
                self.stats.dummy_steps += 1
                continue
            result = engine.step_modern()
            self.stats.steps += 1
            self.stats.chunked_prefill_steps += context.chunked_prefill_request_id != -1
            self.stats.max_active_requests = max(
                self.stats.max_active_requests,
                len(result["active_request_ids"]) + len(result["finished_request_records"]))
            self.stats.peak_kv_blocks = max(self.stats.peak_kv_blocks,
                                            allocator.total_count - allocator.total_avail)
            for record in result["finished_request_records"]:
                self._finish(ids, call, record.merge())

    def _finish(self, ids: dict[int, int], call: _Call, request: Any) -> None:
        from megatron.core.inference.inference_request import Status

        if request.status == Status.FAILED:
            events = "; ".join(str(e.payload) for e in request.events
                               if e.payload is not None)
            raise RuntimeError(
                f"the rollout engine could not take a request of {len(request.prompt_tokens)} "
                f"prompt tokens (+{request.sampling_params.num_tokens_to_generate} new): "
                f"{events or 'it does not fit the KV cache'}; raise rollout.kv_cache_gib")
        index = ids[request.request_id]
        params = call.requests[index].params
        tokens = list(request.generated_tokens)
        logprobs = list(request.generated_log_probs or [])
        if params.eos_id is not None and tokens and tokens[-1] == params.eos_id:
            reason = "eos"
        elif request.request_id in call.stopped:
            reason = "stop"
        else:
            reason = "length"
        routing = None
        if self._router_replays and request.routing_indices is not None:
            routing = torch.from_numpy(request.routing_indices.astype("int16"))
        call.results[index] = Sample(
            prompt_ids=list(call.requests[index].prompt_ids), response_ids=tokens,
            logprobs=logprobs, finished=reason != "length", stop_reason=reason,
            routing=routing)
        if call.on_finish is not None:
            call.on_finish()

    def _stop_string_hits(self, active_request_ids: list[int]) -> set[int]:
        """The controller's stop callback: requests whose response, with the token sampled
        this step, now contains a stop string (they end in this step, token included)."""
        call = self._call
        if call is None or not call.stops:
            return set()
        engine = self._engine
        partial = engine.context.chunked_prefill_request_id
        hits = set()
        for request_id in active_request_ids:
            token = self.sampling.last_tokens.get(request_id)
            if request_id == partial or token is None:
                continue
            tokens = list(engine.get_request(request_id).generated_tokens) + [token]
            if call.stops.hit(tokens):
                hits.add(request_id)
        call.stopped |= hits
        return hits

    def _install_router_replays(self) -> None:
        if not self._router_replays:
            return
        from megatron.core.transformer.moe.router_replay import RouterReplay

        RouterReplay.global_router_replay_instances[:] = self._router_replays
