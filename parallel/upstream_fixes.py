"""Fixes for megatron-core defects that hit every machine, GPU clusters included.

Unlike :mod:`parallel.platform` (CPU-only adaptations), these patches correct megatron-core
itself and are applied on GPU and CPU alike by :func:`apply_upstream_fixes`, which the
rollout engine calls before it builds megatron's dynamic inference engine. Each names
the megatron-core release it was written for (:data:`WRITTEN_FOR`); a different release
is reported when the fixes are applied, so an upgrade makes the author re-check whether
they are still needed.

Defects (megatron-core 0.19.2, ``megatron/core/transformer/multi_latent_attention.py``):

(a) ``MultiLatentAttention.forward`` calls ``flash_decode_and_prefill`` without its
    required ``is_decode_only`` argument, so MLA under dynamic batching raises
    ``TypeError`` before the first token. The fix records the inference context's
    decode-only state at the start of each MLA forward and supplies it when the argument
    is missing.

(b) ``MLASelfAttention.prepare_for_absorption`` (MLA with ``cache_mla_latents``) splits TE's fused
    ``linear_kv_up_proj`` into a *copied* norm and a *copied* linear layer on the first
    forward and deletes the fused module. A refit (megatron's resharding writes the new
    weights by parameter name) then updates tensors the layer no longer reads: prefill
    keeps uncompressing the latent cache with the first step's weights and every step
    normalises latents with the first step's norm weight. The fix derives everything
    from the live parameters: the absorbed K/V up-projections are views of
    ``linear_kv_up_proj.weight`` (refreshed every forward), the uncompressing linear
    layer and (for TE's fused layout) the latent norm read the live weights each call,
    and nothing is deleted. With megatron's local specs (no TE, as on CPU) the norm is
    already a module of its own and the same code applies.

A third defect is handled by the rollout engine rather than here: megatron's prefix cache
is keyed by token ids only, so KV blocks computed before a weight change would be reused
after it. :class:`r1mega.rollout.engine.RolloutEngine` resets the context whenever the
weights may have changed (every generate call starts from an empty cache).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch

WRITTEN_FOR = "0.19.2"

_APPLIED = False
#: megatron-core's own methods that the fixes replace (by ``Class.method`` name).
UPSTREAM: dict[str, Any] = {}


def apply_upstream_fixes() -> None:
    """Apply fixes (a) and (b) once per process (idempotent, any device)."""
    global _APPLIED
    if _APPLIED:
        return
    from megatron.core import package_info
    from megatron.core.transformer import multi_latent_attention as mla

    if package_info.__version__.split("+")[0] != WRITTEN_FOR:
        warnings.warn(
            f"parallel.upstream_fixes was written for megatron-core {WRITTEN_FOR}, found "
            f"{package_info.__version__}; re-check whether {__file__} is still needed.",
            stacklevel=2)
    cls = mla.MultiLatentAttention
    UPSTREAM["MultiLatentAttention.forward"] = cls.forward
    UPSTREAM["MLASelfAttention.prepare_for_absorption"] = \
        mla.MLASelfAttention.prepare_for_absorption
    cls.forward = _record_decode_only(cls.forward)
    cls.flash_decode_and_prefill = _flash_decode_and_prefill_with_mode
    mla.MLASelfAttention.prepare_for_absorption = prepare_for_absorption_live
    _APPLIED = True


# ----------------------------------------------------------------------------- (a)


def _record_decode_only(forward: Any) -> Any:
    """Wrap MLA's forward so the step's decode-only state is known to the attention call."""

    @functools.wraps(forward)
    def wrapper(self: Any, hidden_states: torch.Tensor, attention_mask: Any, *args: Any,
                **kwargs: Any) -> Any:
        context = kwargs.get("inference_context", kwargs.get("inference_params"))
        if context is None and len(args) >= 2:
            context = args[1]  # positional: key_value_states, inference_context, ...
        self._r1mega_decode_only = (context is not None
                                    and not context.is_static_batching()
                                    and context.is_decode_only())
        return forward(self, hidden_states, attention_mask, *args, **kwargs)

    return wrapper


def _flash_decode_and_prefill_with_mode(self: Any, q: torch.Tensor, k: torch.Tensor,
                                        v: torch.Tensor | None, max_seqlen_q: int,
                                        max_seqlen_k: int, cu_seqlens_q: torch.Tensor,
                                        cu_seqlens_k: torch.Tensor, seqlens_k: torch.Tensor,
                                        block_table: torch.Tensor,
                                        is_decode_only: bool | None = None,
                                        softmax_offset: torch.Tensor | None = None
                                        ) -> torch.Tensor:
    """``Attention.flash_decode_and_prefill`` with ``is_decode_only`` taken from the step
    when MLA's forward leaves it out (fix (a))."""
    from megatron.core.transformer.attention import Attention

    if is_decode_only is None:
        is_decode_only = self._r1mega_decode_only
    return Attention.flash_decode_and_prefill(
        self, q, k, v, max_seqlen_q, max_seqlen_k, cu_seqlens_q, cu_seqlens_k, seqlens_k,
        block_table, is_decode_only, softmax_offset=softmax_offset)


# ----------------------------------------------------------------------------- (b)


class _LiveLinear(torch.nn.Module):
    """``x @ W.T`` with ``W`` read from the owning projection at every call (this rank's
    heads, no communication: the latent cache is replicated over TP). Returns
    ``(output, None)`` like megatron's linear layers. The owner is held outside the module
    tree so its parameters keep their names (refit and checkpoints address them)."""

    def __init__(self, owner: torch.nn.Module) -> None:
        super().__init__()
        self._owner = (owner,)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.nn.functional.linear(x, self._owner[0].weight), None


class _LiveFusedNorm(torch.nn.Module):
    """The norm fused into TE's ``LayerNormColumnParallelLinear``, computed with its live
    ``layer_norm_weight`` (and bias, for LayerNorm)."""

    def __init__(self, owner: torch.nn.Module, config: Any) -> None:
        super().__init__()
        self._owner = (owner,)
        self.eps = float(getattr(owner, "eps", config.layernorm_epsilon))
        self.zero_centered_gamma = bool(getattr(owner, "zero_centered_gamma",
                                                config.layernorm_zero_centered_gamma))
        self.normalization = getattr(owner, "normalization", config.normalization)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owner = self._owner[0]
        weight = owner.layer_norm_weight
        if self.zero_centered_gamma:
            weight = weight + 1
        if self.normalization == "RMSNorm":
            return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, self.eps)
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight,
                                              getattr(owner, "layer_norm_bias", None),
                                              self.eps)


def prepare_for_absorption_live(self: Any) -> None:
    """MLA's absorption set-up from the live weights (fix (b)); cheap enough to run on
    every forward, so a refit can never leave a stale copy behind."""
    fused = self.linear_kv_up_proj
    with torch.no_grad():
        if not isinstance(getattr(self, "linear_kv_up_proj_linear", None), _LiveLinear):
            self.linear_kv_up_proj_linear = _LiveLinear(fused)
            if getattr(fused, "layer_norm_weight", None) is not None:
                # TE's spec fuses the latent norm into the up projection and leaves
                # kv_layernorm an identity; cached latents must be normalised.
                self.kv_layernorm = _LiveFusedNorm(fused, self.config)
        weight = fused.weight.view(self.num_attention_heads_per_partition,
                                   self.config.qk_head_dim + self.config.v_head_dim,
                                   self.config.kv_lora_rank)
        self.up_k_weight = weight[:, :self.config.qk_head_dim, :]
        self.up_v_weight = weight[:, self.config.qk_head_dim:, :]
