"""Parameter counts of a :class:`~r1mega.config.ModelConfig`, per component and per layer.

The counts follow the tensors megatron-core's ``GPTModel`` builds for the config (the
same names as in ``r1mega.models.provider``), so they can be checked exactly against a
built model, and they are split by how a parallel layout shards them:

* ``sharded``: split over tensor-parallel ranks (q/k/v/o projections, MLA's q_b/kv_b
  up-projections, dense and shared-expert MLPs, embedding and output head (vocab), MTP's
  eh_proj);
* ``replicated``: whole on every TP rank (RMSNorm weights, the MoE router, MLA's q_a/kv_a
  down-projections, which megatron builds as duplicated linears);
* ``experts``: routed experts, split over expert-parallel x expert-tensor-parallel ranks.

Component formulas (h hidden, a heads, d head dim, g query groups, f FFN size, V vocab):

* GQA attention: ``h*a*d + 2*h*g*d + a*d*h`` (+ ``a*d + 2*g*d`` q/k/v biases);
* MLA: ``h*q_lora + q_lora*a*(qk+pos)`` (or ``h*a*(qk+pos)`` without q compression),
  ``h*(kv_lora+pos) + kv_lora*a*(qk+v) + a*v*h`` plus the q/kv low-rank norms;
* SwiGLU MLP: ``3*h*f`` (gate, up, down); MoE: ``E*h`` router + ``E*3*h*f_e`` routed +
  ``3*h*f_s`` shared;
* two RMSNorms per layer; embedding ``V*h``; untied output head ``V*h``; final norm ``h``;
* MTP layer (DeepSeek-V3): ``enorm + hnorm + eh_proj (2h*h) + a decoder layer + norm``;
  in megatron it shares the embedding and output head with the main model, while the
  Hugging Face release stores its own copies (that is the 671B -> 685B difference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Block", "ModelParams", "count_parameters"]


@dataclass(frozen=True)
class Block:
    """Parameter count of a block, split by how tensor/expert parallelism shards it."""

    sharded: int = 0
    replicated: int = 0
    experts: int = 0

    def __add__(self, other: Block) -> Block:
        return Block(self.sharded + other.sharded, self.replicated + other.replicated,
                     self.experts + other.experts)

    def __mul__(self, n: int) -> Block:
        return Block(self.sharded * n, self.replicated * n, self.experts * n)

    @property
    def total(self) -> int:
        return self.sharded + self.replicated + self.experts

    def dense_per_gpu(self, tp: int) -> float:
        """Non-expert parameters one TP rank holds."""
        return self.sharded / tp + self.replicated

    def experts_per_gpu(self, ep: int, etp: int) -> float:
        """Routed-expert parameters one EP x ETP rank holds."""
        return self.experts / (ep * etp)


def attention_block(m: Any) -> Block:
    """Self-attention of one layer, including its input RMSNorm."""
    h, a = m.hidden_size, m.num_attention_heads
    norm = h
    if m.arch == "deepseek_v3":
        qk = m.qk_head_dim + m.qk_pos_emb_head_dim
        replicated = norm + h * (m.kv_lora_rank + m.qk_pos_emb_head_dim) + m.kv_lora_rank
        sharded = m.kv_lora_rank * a * (m.qk_head_dim + m.v_head_dim) + a * m.v_head_dim * h
        if m.q_lora_rank:
            replicated += h * m.q_lora_rank + m.q_lora_rank
            sharded += m.q_lora_rank * a * qk
        else:
            sharded += h * a * qk
        return Block(sharded=sharded, replicated=replicated)
    d = m.kv_channels or h // a
    g = m.num_query_groups or a
    sharded = h * a * d + 2 * h * g * d + a * d * h
    if m.qkv_bias:
        sharded += a * d + 2 * g * d
    return Block(sharded=sharded, replicated=norm)


def dense_mlp_block(m: Any) -> Block:
    """SwiGLU MLP of a dense layer, including its pre-MLP RMSNorm."""
    return Block(sharded=3 * m.hidden_size * m.ffn_hidden_size, replicated=m.hidden_size)


def moe_mlp_block(m: Any) -> Block:
    """Router + routed experts + shared expert, including the pre-MLP RMSNorm."""
    h, e = m.hidden_size, m.num_experts
    shared = 3 * h * (m.moe_shared_expert_intermediate_size or 0)
    return Block(sharded=shared, replicated=h + e * h,
                 experts=e * 3 * h * m.moe_ffn_hidden_size)


def is_moe_layer(m: Any, index: int) -> bool:
    return m.num_experts is not None and index >= m.first_k_dense_layers


def layer_block(m: Any, index: int) -> Block:
    """Decoder layer ``index`` (0-based): attention + dense or MoE MLP."""
    mlp = moe_mlp_block(m) if is_moe_layer(m, index) else dense_mlp_block(m)
    return attention_block(m) + mlp


def mtp_block(m: Any) -> Block:
    """One multi-token-prediction layer as megatron builds it (embedding/head shared)."""
    h = m.hidden_size
    inner = layer_block(m, m.num_layers - 1)  # megatron reuses the last layer's spec
    return inner + Block(sharded=2 * h * h, replicated=3 * h)  # eh_proj; enorm/hnorm/norm


@dataclass(frozen=True)
class ModelParams:
    """Every parameter of the model, by component (unsharded counts)."""

    embedding: Block
    output: Block  # zero when embeddings are tied
    final_norm: Block
    layers: tuple[Block, ...]
    mtp_layers: tuple[Block, ...]
    attention_per_layer: int
    dense_mlp_per_layer: int
    router_per_layer: int
    routed_experts_per_layer: int
    shared_expert_per_layer: int
    activated: int  # parameters one token passes through (DeepSeek's "activated")

    @property
    def main(self) -> int:
        """The model without MTP (DeepSeek-V3's "671B")."""
        return (self.embedding.total + self.output.total + self.final_norm.total
                + sum(b.total for b in self.layers))

    @property
    def mtp(self) -> int:
        return sum(b.total for b in self.mtp_layers)

    @property
    def total(self) -> int:
        """What megatron trains: main model + MTP layers (sharing embedding and head)."""
        return self.main + self.mtp

    @property
    def hf_total(self) -> int:
        """The Hugging Face checkpoint's count: each MTP layer stores its own embedding
        and output head copies (DeepSeek-V3: ~685B)."""
        copies = len(self.mtp_layers) * (self.embedding.total + (self.output.total
                                                                  or self.embedding.total))
        return self.total + copies


def count_parameters(m: Any) -> ModelParams:
    """Count ``m``'s parameters (a ModelConfig or anything with the same attributes)."""
    h, v = m.hidden_size, m.vocab_size
    layers = tuple(layer_block(m, i) for i in range(m.num_layers))
    mtp = tuple(mtp_block(m) for _ in range(m.mtp_num_layers))
    attention = attention_block(m).total
    dense_mlp = 3 * h * m.ffn_hidden_size
    moe = m.num_experts is not None
    router = m.num_experts * h if moe else 0
    expert = 3 * h * m.moe_ffn_hidden_size if moe else 0
    routed = m.num_experts * expert if moe else 0
    shared = 3 * h * (m.moe_shared_expert_intermediate_size or 0) if moe else 0
    embedding = Block(sharded=v * h)
    output = Block() if m.tie_embeddings else Block(sharded=v * h)
    # Activated per token: everything but the experts a token is not routed to.
    n_moe = sum(is_moe_layer(m, i) for i in range(m.num_layers))
    idle_experts = n_moe * (routed - m.moe_topk * expert) if moe else 0
    main = (embedding.total + output.total + h + sum(b.total for b in layers))
    return ModelParams(
        embedding=embedding, output=output, final_norm=Block(replicated=h), layers=layers,
        mtp_layers=mtp, attention_per_layer=attention, dense_mlp_per_layer=dense_mlp,
        router_per_layer=router, routed_experts_per_layer=routed,
        shared_expert_per_layer=shared, activated=main - idle_experts,
    )
