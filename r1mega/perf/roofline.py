"""The memory-bandwidth roofline of a decode step.

Decoding one token per row is bandwidth-bound: every step reads the weights the batch
passes through and every row's KV cache, and does only ~2 FLOPs per weight byte (bf16)
per row. The fastest a step can possibly be is therefore

    step_time >= (weight bytes read + KV-cache bytes read) / peak memory bandwidth

and the roofline throughput is ``batch / step_time`` tokens/s. What counts as read:

* every non-expert weight once per step (attention, dense MLPs, shared experts, router,
  norms, the output head); the input embedding only for the ``batch`` rows it looks up
  (all of it when it is tied to the output head);
* routed experts: only those the batch's tokens are routed to. With top-``k`` routing
  over ``E`` experts and uniformly spread tokens, an expert escapes all ``B`` tokens with
  probability ``(1 - k/E)^B``, so ``E * (1 - (1 - k/E)^B)`` experts per MoE layer are read
  (a stated assumption: real routing is skewed, which touches fewer);
* the KV cache: each row reads its cached keys and values, ``kv_bytes_per_token *
  context`` per row, where ``context`` is the mean number of cached positions during the
  timed steps.

Activations, logits and the one new KV entry per row are not counted (small next to the
above, and they only raise the bound).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = ["DecodeBytes", "WeightBytes", "decode_step_bytes", "expected_experts_touched",
           "kv_cache_bytes_per_token", "model_weight_bytes", "roofline_tokens_per_s"]

_LAYER = re.compile(r"layers\.(\d+)\.")


def expected_experts_touched(num_experts: int, topk: int, batch: int) -> float:
    """Mean number of distinct experts ``batch`` tokens are routed to, uniform routing."""
    if not 0 < topk <= num_experts or batch < 0:
        raise ValueError(f"topk={topk}, num_experts={num_experts}, batch={batch}")
    return num_experts * (1.0 - (1.0 - topk / num_experts) ** batch)


@dataclass(frozen=True)
class WeightBytes:
    """A model's weight bytes, split by how a decode step reads them."""

    dense: float  # read whole every step
    embedding_row: float  # bytes of one input-embedding row (untied embedding)
    experts: dict[int, float]  # MoE layer number -> bytes of all its routed experts


@dataclass(frozen=True)
class DecodeBytes:
    """Bytes one decode step reads."""

    weights: float
    kv_cache: float

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache


def decode_step_bytes(weights: WeightBytes, num_experts: int | None, topk: int | None,
                      batch: int, kv_bytes_per_token: float, mean_context: float
                      ) -> DecodeBytes:
    """Bytes a decode step of ``batch`` rows reads (module docstring has the rules)."""
    read = weights.dense + batch * weights.embedding_row
    if weights.experts:
        if num_experts is None or topk is None:
            raise ValueError("a model with routed experts needs num_experts and topk")
        fraction = expected_experts_touched(num_experts, topk, batch) / num_experts
        read += fraction * sum(weights.experts.values())
    return DecodeBytes(weights=read, kv_cache=batch * mean_context * kv_bytes_per_token)


def roofline_tokens_per_s(batch: int, step_bytes: float, bytes_per_s: float) -> float:
    """The most tokens/s a bandwidth-bound decode of ``batch`` rows can reach."""
    return batch * bytes_per_s / step_bytes


def model_weight_bytes(model: Any, tied_embedding: bool) -> WeightBytes:
    """Classify a megatron GPTModel's parameters: routed experts (``.experts.`` in the
    name, per layer), the input embedding (``word_embeddings``), everything else."""
    dense, row, experts = 0.0, 0.0, {}
    for name, param in model.named_parameters():
        nbytes = float(param.numel() * param.element_size())
        if ".experts." in name:
            match = _LAYER.search(name)
            layer = int(match.group(1)) if match else -1
            experts[layer] = experts.get(layer, 0.0) + nbytes
        elif "word_embeddings" in name and not tied_embedding:
            row = nbytes / param.shape[0]
        else:
            dense += nbytes
    return WeightBytes(dense=dense, embedding_row=row, experts=experts)


def kv_cache_bytes_per_token(model: Any) -> float:
    """KV-cache bytes of one position across all layers, as the rollout engine allocates
    them for this generation model (:mod:`r1mega.rollout.kv_footprint`: MLA's latent or
    this rank's query groups' keys and values, in the model's dtype)."""
    from r1mega.rollout.kv_footprint import kv_bytes_per_token

    config = model.config
    mla = bool(getattr(config, "cache_mla_latents", False))
    return float(kv_bytes_per_token(
        layers=config.num_layers, tp=config.tensor_model_parallel_size, mla=mla,
        dtype_bytes=next(model.parameters()).element_size(),
        kv_lora_rank=getattr(config, "kv_lora_rank", 0) or 0,
        rope_dim=getattr(config, "qk_pos_emb_head_dim", 0) or 0,
        query_groups=config.num_query_groups or config.num_attention_heads,
        head_dim=config.kv_channels))
