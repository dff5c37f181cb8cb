"""Model FLOPs per token of a :class:`~r1mega.config.ModelConfig`, and MFU.

MFU (model FLOPs utilization) = achieved model FLOP/s / peak FLOP/s, where model FLOPs
are what the architecture needs, not what the implementation runs: activation
recomputation, padding and the GRPO reference pass are not counted.

Forward FLOPs of one token, in a sequence of ``s`` tokens (one multiply-add = 2 FLOPs; h
hidden, a heads, d head dim, g query groups, f FFN size, V vocabulary, L layers):

* attention projections, per layer:
  GQA ``2*(h*a*d + 2*h*g*d + a*d*h)``;
  MLA ``2*(h*q_lora + q_lora*a*(qk+pos))`` (``2*h*a*(qk+pos)`` without q compression)
  ``+ 2*(h*(kv_lora+pos) + kv_lora*a*(qk+v)) + 2*a*v*h``;
* attention scores and the weighted sum of values, per layer: ``2*a*(d_qk + d_v) * c``
  where ``c`` is the mean number of keys a query sees: ``(s+1)/2`` with the causal mask
  (query ``i`` sees ``i+1`` keys), ``s`` without. GQA: ``d_qk = d_v = d``; MLA:
  ``d_qk = qk + pos``, ``d_v = v``;
* MLP, per layer: dense SwiGLU ``2*3*h*f``; MoE ``2*h*E`` (router) ``+ k*2*3*h*f_e``
  (only the ``k`` experts a token is routed to) ``+ 2*3*h*f_s`` (shared experts);
* output head ``2*h*V`` (the embedding lookup is not a GEMM);
* each multi-token-prediction layer (DeepSeek-V3): ``2*2h*h`` (eh_proj) + one decoder
  layer of the last layer's kind + its own pass through the output head ``2*h*V``.

Norms, activations, softmax and rotary embeddings are not counted (a few FLOPs per
element, not per weight). Training FLOPs = 3 x forward: the backward pass computes
gradients for activations and for weights, each as many FLOPs as the forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["FlopsPerToken", "attention_score_flops", "forward_flops_per_token",
           "model_flops_utilization"]


@dataclass(frozen=True)
class FlopsPerToken:
    """Forward FLOPs of one token, by component (summed over layers)."""

    attention_projections: float
    attention_scores: float
    mlp: float
    output_head: float
    mtp: float  # everything the MTP layers add, head included

    @property
    def forward(self) -> float:
        return (self.attention_projections + self.attention_scores + self.mlp
                + self.output_head + self.mtp)

    @property
    def training(self) -> float:
        """Forward + backward (2x forward) model FLOPs of one trained token."""
        return 3.0 * self.forward

    def as_dict(self) -> dict[str, float]:
        return {"attention_projections": self.attention_projections,
                "attention_scores": self.attention_scores, "mlp": self.mlp,
                "output_head": self.output_head, "mtp": self.mtp, "forward": self.forward,
                "training": self.training}


def _attention_projections(m: Any) -> float:
    h, a = m.hidden_size, m.num_attention_heads
    if m.arch == "deepseek_v3":
        qk = m.qk_head_dim + m.qk_pos_emb_head_dim
        q = h * m.q_lora_rank + m.q_lora_rank * a * qk if m.q_lora_rank else h * a * qk
        kv = h * (m.kv_lora_rank + m.qk_pos_emb_head_dim) + m.kv_lora_rank * a * (
            m.qk_head_dim + m.v_head_dim)
        return 2.0 * (q + kv + a * m.v_head_dim * h)
    d = m.kv_channels or h // a
    g = m.num_query_groups or a
    return 2.0 * (h * a * d + 2 * h * g * d + a * d * h)


def attention_score_flops(m: Any, mean_keys: float) -> float:
    """Forward FLOPs of QK^T and PV in one layer for a query that sees ``mean_keys`` keys."""
    a = m.num_attention_heads
    if m.arch == "deepseek_v3":
        dims = m.qk_head_dim + m.qk_pos_emb_head_dim + m.v_head_dim
    else:
        dims = 2 * (m.kv_channels or m.hidden_size // a)
    return 2.0 * a * dims * mean_keys


def _is_moe(m: Any, index: int) -> bool:
    return m.num_experts is not None and index >= m.first_k_dense_layers


def _mlp(m: Any, index: int) -> float:
    h = m.hidden_size
    if not _is_moe(m, index):
        return 2.0 * 3 * h * m.ffn_hidden_size
    shared = m.moe_shared_expert_intermediate_size or 0
    return 2.0 * (h * m.num_experts + m.moe_topk * 3 * h * m.moe_ffn_hidden_size
                  + 3 * h * shared)


def forward_flops_per_token(m: Any, seq_length: int, causal: bool = True) -> FlopsPerToken:
    """Forward FLOPs of one token of ``m`` in sequences of ``seq_length`` (module docstring
    has the formula)."""
    if seq_length < 1:
        raise ValueError(f"seq_length={seq_length} must be >= 1")
    mean_keys = (seq_length + 1) / 2 if causal else float(seq_length)
    layers = range(m.num_layers)
    projections = _attention_projections(m) * m.num_layers
    scores = attention_score_flops(m, mean_keys) * m.num_layers
    mlp = sum(_mlp(m, i) for i in layers)
    head = 2.0 * m.hidden_size * m.vocab_size
    mtp_layer = (2.0 * 2 * m.hidden_size * m.hidden_size + _attention_projections(m)
                 + attention_score_flops(m, mean_keys) + _mlp(m, m.num_layers - 1) + head)
    return FlopsPerToken(attention_projections=projections, attention_scores=scores, mlp=mlp,
                         output_head=head, mtp=m.mtp_num_layers * mtp_layer)


def model_flops_utilization(tokens_per_s: float, flops_per_token: float,
                            peak_flops: float) -> float:
    """Achieved model FLOP/s over the peak: ``tokens/s * FLOPs/token / peak``."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops={peak_flops} must be > 0")
    return tokens_per_s * flops_per_token / peak_flops
