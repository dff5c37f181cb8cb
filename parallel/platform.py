"""CPU platform layer: what megatron-core needs to run without a GPU.

megatron-core is written for CUDA. On a CPU-only machine (CI, laptops, the
2-core development boxes) a handful of its code paths touch CUDA
unconditionally. Everything the project changes in megatron-core to run there
lives in this one module, is applied by :func:`apply_cpu_platform` only when
``torch.cuda.is_available()`` is False, and is idempotent. Each adaptation
names the megatron-core version it was written against; :data:`WRITTEN_FOR`
is checked at apply time and a mismatch is reported (not silently ignored),
so an upgrade makes the author re-read this file.

Adaptations (megatron-core 0.19.2):

1. ``torch.cuda.current_device()`` is called at module construction and in
   forward passes (rotary embeddings, the MoE router's expert-bias buffers,
   tensor-parallel buffers, MTP trackers) regardless of
   ``use_cpu_initialization``, and small bookkeeping tensors are created with a
   literal ``device="cuda"`` (token counts in the pipeline schedules, grad-norm
   and found-inf buffers in the optimizers and grad clipping). Without a driver
   both raise. ``current_device()`` returns ``"cpu"``, and torch's tensor
   factories (and ``Tensor.cuda``) map a CUDA device to the CPU.
2. ``megatron.core.transformer.utils.get_default_causal_mask`` builds its mask
   with ``device="cuda"``. Replaced by the same mask on the CPU.
3. The local ``DotProductAttention`` does not accept MLA's ``k_channels`` /
   ``v_channels`` (query/key and value head dims differ in MLA) nor packed
   sequences, and refuses context parallelism (TE's ring attention does it on GPU).
   :class:`SDPACoreAttention` is the project's core attention for the non-TE path:
   torch's scaled-dot-product attention with an explicit softmax scale, GQA, causal
   masking, THD-packed sequences, and context parallelism by all-gathering keys and
   values over the CP group (backward: reduce-scatter of their gradients).
4. ``model_parallel_cuda_manual_seed`` raises without CUDA, and the tensor-parallel
   RNG tracker forks CUDA generator states (embedding, initialisation, recompute).
   On CPU the tracker's get/set functions act on the CPU generator, and
   :func:`manual_seed` seeds the tracker with CPU states.
5. ``torch.cuda.synchronize`` / ``empty_cache`` / memory queries are called by
   schedules and optimizers for timing and bookkeeping, and the DDP grad buffers
   ask for ``torch.cuda.current_stream()`` even without overlap: synchronisation
   and memory queries become no-ops and streams/events are torch's CPU ones.
6. megatron-core's non-TE norm (``WrappedTorchNorm``) refuses sequence parallelism,
   which megatron-core requires for MoE with TP > 1. :class:`SequenceParallelRMSNorm`
   is torch's RMSNorm whose weight carries ``sequence_parallel`` like TE's norms, so
   ``finalize_model_grads`` all-reduces its gradient across the TP group.

7. MLA's non-TE spec builds its q/kv down projections as ``ColumnParallelLinear``
   with ``gather_output=False``; the gradient of the shared rotary key (k_pos_emb)
   then keeps only the last TP rank's heads (the gather's backward splits without
   summing), so TP > 1 gets wrong gradients. TE's spec uses duplicated
   projections instead. :class:`DuplicatedLinear` (megatron-core's local
   duplicated ``Linear`` with the configured init) is registered under the name
   MLA checks for that mode, and the local MLA spec uses it (``r1mega.models.specs``).
8. The mixed-precision and distributed optimizers sort parameters by their type
   string (``param.type() == "torch.cuda.FloatTensor"``) while they are built and
   reject anything else. Their constructors run with CPU tensors reporting the
   CUDA type names (only for the argument-less ``Tensor.type()`` and only during
   those constructors and gradient clipping, which asserts the same).

9. The gloo refit copy service (``megatron.core.resharding``) and the RL offload
   helpers stage through pinned host buffers (``pin_memory=True``), which needs a CUDA
   driver. Without a GPU the host *is* the device: pinning is dropped.

The MoE ``alltoall`` dispatcher creates CUDA streams; on CPU the model
provider selects the ``allgather`` dispatcher (see ``r1mega.models``), which is
numerically identical.

Dynamic inference (megatron-core 0.19.2's ``DynamicInferenceEngine`` /
``DynamicInferenceContext`` / ``TextGenerationController``, the rollout engine's path on
every machine):

10. The engine times its steps with ``torch.cuda.Event(enable_timing=True)``;
    torch's CPU event takes no arguments and has no ``elapsed_time``.
    :class:`_CpuEvent` records a wall-clock time instead.
11. Dynamic batching attends over a paged KV cache (a block table per request) with
    flash-attention's varlen/paged kernels (``Attention.flash_decode_and_prefill``)
    and, for MLA's absorbed decode, FlashMLA; ``Attention.forward`` also asserts
    that flash-attn is installed. :func:`paged_attention` is the same computation in
    torch: each request's blocks gathered from the block table, bottom-right causal
    masking (a chunk of new queries sees every earlier key), GQA, and MLA's absorbed
    decode over the latent cache (values are the latent's first ``kv_lora_rank``
    channels, as FlashMLA reads them).
12. ``dynamic_context`` imports a Triton KV-append kernel whenever Triton imports (it
    does on CPU); launching it fails. It is switched off, so megatron's own indexed
    copy appends keys and values. The KV buffer, allocated uninitialised, is zeroed
    once when allocated, so slots no request has written hold no NaN (which would leak
    through a zero attention weight in :func:`paged_attention`).
13. ``torch.cuda.memory_stats()`` feeds the engine's suspend/resume and step logs;
    on CPU it reports zero device bytes.
14. MoE layers under expert parallelism run megatron's training ``allgather``
    dispatcher on CPU (the inference dispatchers need NVLink/NCCL buffers or TE), which
    gathers equal-shaped tensors over the TP x EP group; dynamic batches give each
    EP rank its own token count. During inference, :func:`_pad_moe_tokens_to_group`
    pads each MoE layer's input to the group's largest token count and drops the
    padding from the output (padding tokens never mix with real ones: routing and
    expert MLPs act per token).
15. Each step's tokens are padded to a multiple of 64 (``TOKEN_ROUNDER``; GPU tile and
    CUDA-graph shapes): a decode step of 3 live requests computes 64 rows. A CPU's cost
    is proportional to rows, so the rounder is 1 (steps are still padded to a multiple
    of the TP size). ``suspend()`` calls ``delete_cuda_graphs()``, whose full
    ``gc.collect()`` takes seconds in a large process; there are no CUDA graphs on CPU.

MLA's ``prepare_for_absorption`` calls a TE-only split of ``linear_kv_up_proj``; with
local specs the absorbed weights are views of the live projection. That is part of the
upstream fix in :mod:`parallel.upstream_fixes`, which applies on GPU as well.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import torch

WRITTEN_FOR = "0.19.2"

_APPLIED = False


def gpu_available() -> bool:
    """True when CUDA is usable; the platform layer is then never applied."""
    return torch.cuda.is_available()


def default_backend() -> str:
    """torch.distributed backend for this machine: nccl on GPU, gloo on CPU."""
    return "nccl" if gpu_available() else "gloo"


_FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint",
              "empty_like", "zeros_like", "ones_like", "full_like")


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


def _on_cpu(factory: Any) -> Any:
    """Wrap a torch tensor factory so ``device="cuda"`` (or cuda:N) means the CPU."""

    @functools.wraps(factory)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False  # pinning needs a CUDA driver (adaptation 9)
        return factory(*args, **kwargs)

    wrapper.__r1mega_cpu__ = True  # type: ignore[attr-defined]
    return wrapper


def _with_cuda_type_names(fn: Any) -> Any:
    """Run ``fn`` with ``Tensor.type()`` (no arguments) naming CPU tensors as CUDA ones."""
    original_type = torch.Tensor.type

    def cuda_named_type(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        result = original_type(self, *args, **kwargs)
        if not args and not kwargs and isinstance(result, str) and result.startswith("torch."):
            return result.replace("torch.", "torch.cuda.", 1)
        return result

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        torch.Tensor.type = cuda_named_type  # type: ignore[method-assign]
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.type = original_type  # type: ignore[method-assign]

    return wrapper


class _CpuStream(torch.cpu.Stream):
    """torch's CPU stream plus the CUDA stream methods megatron-core calls (adaptation 5).

    CPU work is synchronous, so waiting on or synchronising a stream has nothing to do.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> _CpuStream:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True


def apply_cpu_platform() -> bool:
    """Apply every CPU adaptation once. Returns True if they are (now) active."""
    global _APPLIED
    if gpu_available():
        return False
    if _APPLIED:
        return True
    import megatron.core
    from megatron.core import package_info

    # megatron-core appends "+<git sha of the current directory>" when run inside a git
    # checkout; only the release matters here.
    if package_info.__version__.split("+")[0] != WRITTEN_FOR:
        warnings.warn(
            f"parallel.platform was written for megatron-core {WRITTEN_FOR}, found "
            f"{package_info.__version__}; re-check the adaptations in {__file__}.",
            stacklevel=2,
        )
    del megatron

    # (1) CUDA device queries and CUDA tensor factories resolve to the CPU.
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    # torch lists its factory functions once (for `with torch.device(...)`); list the
    # originals before wrapping them, or that context manager stops applying.
    from torch.utils import _device as torch_device_mode

    torch_device_mode._device_constructors()
    for name in _FACTORIES:
        setattr(torch, name, _on_cpu(getattr(torch, name)))
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[assignment]
    # (9) Pinned host buffers (refit staging, offload) are ordinary host memory.
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self  # type: ignore[assignment]
    # (5) Synchronisation and allocator bookkeeping become no-ops.
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    torch.cuda.empty_cache = lambda: None  # type: ignore[assignment]
    torch.cuda.memory_allocated = lambda device=None: 0  # type: ignore[assignment]
    torch.cuda.max_memory_allocated = lambda device=None: 0  # type: ignore[assignment]
    torch.cuda.memory_reserved = lambda device=None: 0  # type: ignore[assignment]
    torch.cuda.current_stream = lambda device=None: _CpuStream()  # type: ignore
    torch.cuda.Stream = _CpuStream  # type: ignore[assignment,misc]
    torch.cuda.Event = torch.cpu.Event  # type: ignore[assignment,misc]
    torch.cuda.stream = torch.cpu.stream  # type: ignore[assignment]

    # (2) The default causal mask is built on the CPU.
    from megatron.core.transformer import utils as transformer_utils

    @functools.cache
    def _cpu_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    transformer_utils.get_default_causal_mask = _cpu_causal_mask

    # (4) The tensor-parallel RNG tracker forks the CPU generator.
    from megatron.core.tensor_parallel import random as tp_random

    def _get_rng_state(device: Any = None, clone: bool = False, graph_safe: bool = False):
        return torch.get_rng_state()

    def _set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False):
        torch.set_rng_state(new_state)

    tp_random._get_cuda_rng_state = _get_rng_state
    tp_random._set_cuda_rng_state = _set_rng_state

    # (8) Optimizer constructors see CUDA type names.
    from megatron.core.optimizer import distrib_optimizer, optimizer

    distrib_optimizer.DistributedOptimizer.__init__ = _with_cuda_type_names(
        distrib_optimizer.DistributedOptimizer.__init__)
    optimizer.Float16OptimizerWithFloat16Params.__init__ = _with_cuda_type_names(
        optimizer.Float16OptimizerWithFloat16Params.__init__)
    optimizer.clip_grad_by_total_norm_fp32 = _with_cuda_type_names(
        optimizer.clip_grad_by_total_norm_fp32)

    # (7) MLA recognises the duplicated down projection.
    from megatron.core.transformer import multi_latent_attention

    if multi_latent_attention.TELinear is None:
        multi_latent_attention.TELinear = duplicated_linear_class()
    _apply_dynamic_inference_adaptations()
    _APPLIED = True
    return True


class _CpuEvent:
    """A CUDA-event stand-in with timing (adaptation 10): ``record`` notes the wall clock
    (CPU work is synchronous, so the clock is where the stream is)."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False,
                 interprocess: bool = False, external: bool = False) -> None:
        self._time: float | None = None

    def record(self, stream: Any = None) -> None:
        import time

        self._time = time.perf_counter()

    def wait(self, stream: Any = None) -> None:
        return None

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None

    def elapsed_time(self, end_event: _CpuEvent) -> float:
        """Milliseconds from this event to ``end_event``, as CUDA events report them."""
        if self._time is None or end_event._time is None:
            raise RuntimeError("both events must be recorded before elapsed_time")
        return (end_event._time - self._time) * 1000.0


def _cpu_memory_stats(device: Any = None) -> dict[str, int]:
    """Adaptation 13: the allocator counters megatron's logs read, all zero on CPU."""
    return {f"{kind}.all.{when}": 0 for kind in ("allocated_bytes", "reserved_bytes",
                                                 "allocation")
            for when in ("current", "peak")}


def _apply_dynamic_inference_adaptations() -> None:
    """Adaptations 10-15 (megatron-core 0.19.2's dynamic inference engine on CPU)."""
    from megatron.core.inference.contexts import dynamic_context
    from megatron.core.inference.engines import dynamic_engine
    from megatron.core.transformer import attention
    from megatron.core.transformer.moe import moe_layer

    torch.cuda.Event = _CpuEvent  # type: ignore[assignment,misc]  (10)
    attention.Attention.flash_decode_and_prefill = _paged_attention_method  # (11)
    attention.is_fa_min_version = lambda version, check_equality=True: True  # (11)
    dynamic_context.triton_append_key_value_cache = None  # (12)
    allocate = dynamic_context.DynamicInferenceContext._allocate_memory_buffer

    def allocate_zeroed(self: Any) -> None:
        allocate(self)
        self.memory_buffer.zero_()

    dynamic_context.DynamicInferenceContext._allocate_memory_buffer = allocate_zeroed  # (12)
    torch.cuda.memory_stats = _cpu_memory_stats  # type: ignore[assignment]  (13)
    moe_layer.MoELayer.forward = _pad_moe_tokens_to_group(moe_layer.MoELayer.forward)  # (14)
    dynamic_context.DynamicInferenceContext.TOKEN_ROUNDER = 1  # (15)
    dynamic_engine.delete_cuda_graphs = lambda: None  # (15)


def _pad_moe_tokens_to_group(forward: Any) -> Any:
    """Wrap ``MoELayer.forward`` so that, during inference with expert parallelism, every
    rank of the TP x EP group passes the same number of tokens (adaptation 14)."""

    @functools.wraps(forward)
    def padded_forward(self: Any, hidden_states: torch.Tensor, *args: Any,
                       **kwargs: Any) -> Any:
        from megatron.core.inference.utils import InferenceMode

        group = self.token_dispatcher.tp_ep_group
        if not InferenceMode.is_active() or group is None or group.size() == 1:
            return forward(self, hidden_states, *args, **kwargs)
        count = torch.tensor([hidden_states.shape[0]], dtype=torch.long)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX, group=group)
        extra = int(count) - hidden_states.shape[0]
        if extra == 0:
            return forward(self, hidden_states, *args, **kwargs)
        pad = hidden_states.new_zeros(extra, *hidden_states.shape[1:])
        output, bias = forward(self, torch.cat([hidden_states, pad]), *args, **kwargs)
        return output[:hidden_states.shape[0]], bias

    return padded_forward


def _paged_attention_method(self: Any, q: torch.Tensor, k: torch.Tensor,
                            v: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
                            cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                            seqlens_k: torch.Tensor, block_table: torch.Tensor,
                            is_decode_only: bool, softmax_offset: torch.Tensor | None = None
                            ) -> torch.Tensor:
    """``Attention.flash_decode_and_prefill`` on CPU (adaptation 11), same signature."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig
    from megatron.core.transformer.utils import is_layer_window_attention

    if softmax_offset is not None:
        raise NotImplementedError("paged attention on CPU does not implement softmax sinks")
    if is_layer_window_attention(self.config.window_size, self.config.window_attn_skip_freq,
                                 self.layer_number):
        raise NotImplementedError("paged attention on CPU does not implement sliding windows")
    scale = getattr(self, "softmax_scale", None)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    latent_rank = None
    if is_decode_only and isinstance(self.config, MLATransformerConfig) \
            and hasattr(self, "softmax_scale"):
        latent_rank = self.config.kv_lora_rank  # absorbed decode over the latent cache
    out = paged_attention(q.squeeze(1), k, v, cu_seqlens_q, seqlens_k, block_table, scale,
                          latent_rank=latent_rank, sanitized=True)
    return out.unsqueeze(1)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor | None,
                    cu_seqlens_q: torch.Tensor, seqlens_k: torch.Tensor,
                    block_table: torch.Tensor, scale: float,
                    latent_rank: int | None = None, sanitized: bool = False) -> torch.Tensor:
    """Attention of packed new queries over a paged KV cache, as flash-attention's paged
    kernels compute it.

    ``q`` is ``[total_q, heads, d]``: request ``i`` owns rows ``cu_seqlens_q[i]:
    cu_seqlens_q[i+1]``, the newest of its ``seqlens_k[i]`` tokens. ``k_cache``/``v_cache``
    are ``[blocks, block_size, kv_heads, d]``; request ``i``'s tokens live in blocks
    ``block_table[i, :]`` in order. Query ``j`` of a request with ``n`` new and ``L`` total
    tokens attends to keys ``0 .. L - n + j`` (bottom-right causal). With ``latent_rank``
    (MLA's absorbed decode) ``k_cache`` is the latent cache ``[blocks, block_size,
    latent]``, shared by all heads, and the values are its first ``latent_rank``
    channels. Rows of padding requests (zero keys) and trailing padding rows are zero.
    ``sanitized`` says that every slot of the caches holds a finite value (the engine's
    zeroed buffer), which saves masking the values.
    """
    if latent_rank is not None:
        k_cache = k_cache.unsqueeze(2)
        v_cache = k_cache[..., :latent_rank]
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    out = q.new_zeros(q.shape[0], heads, v_cache.shape[-1])
    lengths = seqlens_k.tolist()
    starts = cu_seqlens_q.tolist()
    real = [i for i, n in enumerate(lengths) if n > 0]
    if not real:
        return out
    block = k_cache.shape[1]
    width = max(-(-lengths[i] // block) for i in real)
    device = q.device
    rows = torch.tensor(real, device=device)
    table = block_table.to(device)[rows, :width].long().clamp_min(0)
    keys = k_cache[table].flatten(1, 2)  # [n, width * block, kv_heads, d]
    values = v_cache[table].flatten(1, 2)
    total = torch.tensor([lengths[i] for i in real], device=device)[:, None, None]
    key_pos = torch.arange(keys.shape[1], device=device)[None, None, :]
    if not sanitized:
        # Slots past a request's length may hold anything: a NaN value would leak through
        # a zero attention weight. (Scores of such slots are overwritten by the mask.)
        values = torch.where((key_pos < total)[:, 0, :, None, None], values, 0)
    new = [starts[i + 1] - starts[i] for i in real]
    longest = max(new)
    n, rep = len(real), heads // kv_heads
    # Packed query rows -> [n, longest] slots (a gather/scatter index, not a Python loop).
    counts = torch.tensor(new, device=device)
    source = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in real]) \
        if longest > 1 else torch.tensor([starts[i] for i in real])
    source = source.to(device)
    slot_of = torch.repeat_interleave(torch.arange(n, device=device), counts)
    offset = torch.arange(len(source), device=device) - torch.repeat_interleave(
        counts.cumsum(0) - counts, counts)
    target = slot_of * longest + offset
    query = q.new_zeros(n * longest, heads, q.shape[-1]).index_copy_(0, target, q[source])
    query = query.view(n, longest, heads, -1)
    fresh = counts[:, None, None]
    query_pos = total - fresh + torch.arange(longest, device=device)[None, :, None]
    allowed = (key_pos <= query_pos) & (key_pos < total)  # [n, longest, keys]
    # Grouped-query attention with explicit matmuls: each key/value head serves its
    # ``rep`` query heads without being copied (torch's SDPA with a mask takes its slow
    # path on CPU, ~50x slower at decode shapes).
    grouped = query.view(n, longest, kv_heads, rep, -1).permute(0, 2, 3, 1, 4)
    scores = torch.matmul(grouped.reshape(n, kv_heads, rep * longest, -1),
                          keys.permute(0, 2, 3, 1)) * scale  # [n, kv_heads, rep*q, keys]
    scores = scores.view(n, kv_heads, rep, longest, -1).masked_fill(
        ~allowed[:, None, None], float("-inf"))
    weights = torch.softmax(scores, dim=-1).view(n, kv_heads, rep * longest, -1)
    attended = torch.matmul(weights, values.permute(0, 2, 1, 3))  # [n, kv_heads, rep*q, dv]
    attended = attended.view(n, kv_heads, rep, longest, -1).permute(0, 3, 1, 2, 4).reshape(
        n * longest, heads, -1)
    out[source] = attended[target]
    return out


def manual_seed(seed: int) -> None:
    """Seed torch and megatron's tensor-parallel RNG tracker on any device.

    On GPU this is ``model_parallel_cuda_manual_seed``. On CPU (adaptation 4) the
    tracker's named states are CPU generator states, derived the same way
    (model-parallel seed offset by 2718 + TP rank, data-parallel seed = seed).
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as tp_random

    torch.manual_seed(seed)
    if gpu_available():
        tp_random.model_parallel_cuda_manual_seed(seed)
        return
    tracker = tp_random.get_cuda_rng_tracker()
    tracker.reset()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    states = {
        tp_random._MODEL_PARALLEL_RNG_TRACKER_NAME: seed + 2718 + tp_rank,
        tp_random._DATA_PARALLEL_RNG_TRACKER_NAME: seed,
        tp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME: seed + 2718 + 100 * ep_rank + etp_rank,
    }
    for name, state_seed in states.items():
        generator = torch.Generator().manual_seed(state_seed)
        tracker.states_[name] = generator.get_state()
        tracker.seeds_.add(state_seed)


class SDPACoreAttention(torch.nn.Module):
    """Core attention on torch SDPA, for the non-Transformer-Engine path (adaptation 3).

    Same constructor and call signature as megatron-core's ``DotProductAttention``
    (so layer specs can swap it in), plus MLA's ``k_channels``/``v_channels``.
    Inputs are ``[s, b, heads, dim]`` (or ``[t, heads, dim]`` with THD-packed
    sequences); the output is ``[s, b, heads * v_dim]``.
    """

    def __init__(
        self,
        config: Any,
        layer_number: int,
        attn_mask_type: Any,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        k_channels: int | None = None,
        v_channels: int | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
        **_: Any,
    ) -> None:
        super().__init__()
        from megatron.core.transformer.enums import AttnMaskType

        tp_size = (
            pg_collection.tp.size()
            if pg_collection is not None and getattr(pg_collection, "tp", None) is not None
            else 1
        )
        self.cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        if self.cp_group is None and config.context_parallel_size > 1:
            from megatron.core import parallel_state

            self.cp_group = parallel_state.get_context_parallel_group()
        self.config = config
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self._causal_types = (AttnMaskType.causal, AttnMaskType.padding_causal)
        self.num_heads = config.num_attention_heads // tp_size
        self.num_groups = (config.num_query_groups or config.num_attention_heads) // tp_size
        self.k_channels = k_channels or config.kv_channels
        self.hidden_size_per_attention_head_v = v_channels or config.kv_channels
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.k_channels)
        )
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                mask: torch.Tensor | None) -> torch.Tensor:
        # q/k/v: [b, heads, s, d]; GQA: SDPA shares each key/value head among its group of
        # query heads itself (no copies of the keys and values).
        attn_mask = None
        if mask is not None:
            attn_mask = ~mask.bool()  # megatron masks are True where attention is blocked
            causal = False
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=causal and attn_mask is None,
            dropout_p=self.dropout_p if self.training else 0.0, scale=self.softmax_scale,
            enable_gqa=self.num_heads != k.shape[1],
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: Any = None,
        attention_bias: Any = None,
        packed_seq_params: Any = None,
        **_: Any,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention does not take an attention bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type in self._causal_types
        cp_size = self.cp_group.size() if self.cp_group is not None else 1
        if cp_size > 1:
            if packed_seq_params is not None or attention_mask is not None or not causal:
                raise NotImplementedError(
                    "SDPACoreAttention splits causal, unpacked sequences without an explicit "
                    "mask over context-parallel ranks only")
            return self._context_parallel_forward(query, key, value)
        if packed_seq_params is not None:
            # THD: [t, heads, d]; attend within each packed sequence.
            cu = packed_seq_params.cu_seqlens_q.tolist()
            outs = []
            for start, end in zip(cu[:-1], cu[1:], strict=True):
                q = query[start:end].transpose(0, 1).unsqueeze(0)
                k = key[start:end].transpose(0, 1).unsqueeze(0)
                v = value[start:end].transpose(0, 1).unsqueeze(0)
                outs.append(self._attend(q, k, v, causal, None)[0].transpose(0, 1))
            out = torch.cat(outs, dim=0)
            return out.reshape(out.shape[0], -1)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask = attention_mask if not causal or attention_mask is not None else None
        out = self._attend(q, k, v, causal, mask)
        # [b, h, s, dv] -> [s, b, h * dv]
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)

    def _context_parallel_forward(self, query: torch.Tensor, key: torch.Tensor,
                                  value: torch.Tensor) -> torch.Tensor:
        """Causal attention of this CP rank's queries against the whole sequence.

        Inputs hold this rank's two load-balanced chunks (``[s / cp, b, heads, d]``,
        :func:`parallel.layout.context_parallel_positions`). Keys and values are
        all-gathered over the CP group with megatron-core's sequence-parallel gather,
        whose backward reduce-scatters the gradients (every rank's queries attend to every
        rank's keys, so a key's gradient is the sum over ranks), then put in sequence
        order; the causal mask compares global positions.
        """
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        from parallel.layout import context_parallel_positions

        cp_size, cp_rank = self.cp_group.size(), self.cp_group.rank()
        local = query.shape[0]
        total = local * cp_size
        held = torch.cat([context_parallel_positions(total, r, cp_size) for r in range(cp_size)])
        in_order = torch.argsort(held).to(key.device)
        full_k, full_v = (
            gather_from_sequence_parallel_region(t, tensor_parallel_output_grad=True,
                                                 group=self.cp_group).index_select(0, in_order)
            for t in (key, value))
        q_pos = context_parallel_positions(total, cp_rank, cp_size).to(query.device)
        allowed = torch.arange(total, device=query.device).unsqueeze(0) <= q_pos.unsqueeze(1)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, full_k, full_v))
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.dropout_p if self.training else 0.0,
            scale=self.softmax_scale, enable_gqa=self.num_heads != k.shape[1])
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm usable under sequence parallelism (adaptation 6).

    Same constructor as megatron-core's ``WrappedTorchNorm`` builder. Under sequence
    parallelism each TP rank normalises a different slice of the sequence, so the
    weight gradient is partial; marking the weight ``sequence_parallel`` makes
    megatron-core's ``finalize_model_grads`` sum it over the TP group.
    """

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **_: Any) -> None:
        if config.normalization != "RMSNorm":
            raise NotImplementedError("the CPU platform layer provides RMSNorm only")
        super().__init__(normalized_shape=hidden_size, eps=eps)
        self.weight.sequence_parallel = bool(config.sequence_parallel)


@functools.lru_cache(maxsize=1)
def duplicated_linear_class() -> type:
    """megatron-core's local duplicated ``Linear`` with the config's init (adaptation 7).

    Every TP rank holds the full weight; under sequence parallelism the weight is marked
    ``sequence_parallel`` so its partial gradients are summed over TP.
    """
    from megatron.core.post_training.modelopt.layers import Linear

    class DuplicatedLinear(Linear):
        def __init__(self, input_size: int, output_size: int, *, config: Any,
                     init_method: Any, **kwargs: Any) -> None:
            kwargs["parallel_mode"] = "duplicated"
            kwargs["tp_group"] = None
            super().__init__(input_size, output_size, config=config, init_method=init_method,
                             **kwargs)
            if config.perform_initialization:
                with torch.no_grad():
                    init_method(self.weight)

        def sharded_state_dict(self, prefix: str = "", sharded_offsets: Any = (),
                               metadata: Any = None) -> Any:
            # Replicated over TP: each TP rank is one replica (the parent class would
            # mark every rank replica 0, which dist_checkpointing rejects).
            from megatron.core import parallel_state
            from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

            return make_sharded_tensors_for_checkpoint(
                self.state_dict(prefix="", keep_vars=True), prefix,
                sharded_offsets=sharded_offsets,
                tp_group=parallel_state.get_tensor_model_parallel_group(),
                dp_cp_group=metadata["dp_cp_group"] if metadata else
                parallel_state.get_data_parallel_group(with_context_parallel=True),
            )

    return DuplicatedLinear
