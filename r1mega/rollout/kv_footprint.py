"""How much KV memory the rollout engine takes: one rule for the engine and the planner.

megatron-core's dynamic inference context (0.19.2) stores KV in fixed-size blocks. A
token costs, across the layers one rank holds:

* MLA (``cache_mla_latents``): one latent vector ``kv_lora_rank + qk_pos_emb_head_dim``
  per layer, shared by all heads and not split over TP (every rank up-projects its heads
  from it): ``(kv_lora_rank + rope_dim) x layers x bytes``;
* otherwise: a key and a value per query group this rank holds (``groups / tp``, at least
  one): ``2 x layers x groups_per_rank x head_dim x bytes``.

The engine's buffer is ``rollout.kv_cache_gib`` when set; otherwise room for every
request of a generate call (at most ``max_batch_size`` per replica) at full length
(longest prompt + ``max_new_tokens``), plus megatron's dummy block. Shared prompt
blocks (prefix caching) then leave room to spare. The context's maximum sequence length
is rounded up to a power of two in blocks, so a growing response budget re-sizes the
block table rarely. Torch-free: configuration checks and ``r1mega plan`` use it.
"""

from __future__ import annotations

import math

# megatron-core's FlashMLA decode path needs 64-token KV blocks (asserted by its context).
MLA_BLOCK_TOKENS = 64
# megatron-core's default block; flash-attention 2's paged kernels need multiples of 256.
DENSE_BLOCK_TOKENS = 256
GIB = 1024**3


def block_tokens(mla: bool, configured: int | None = None) -> int:
    """The KV block size: ``rollout.kv_block_tokens`` or the default for the attention."""
    return configured or (MLA_BLOCK_TOKENS if mla else DENSE_BLOCK_TOKENS)


def kv_bytes_per_token(*, layers: int, dtype_bytes: int, tp: int, mla: bool,
                       kv_lora_rank: int = 0, rope_dim: int = 0, query_groups: int = 0,
                       head_dim: int = 0) -> int:
    """KV bytes one token occupies on one rank (module docstring has the rule)."""
    if mla:
        return dtype_bytes * layers * (kv_lora_rank + rope_dim)
    return dtype_bytes * 2 * layers * max(query_groups // tp, 1) * head_dim


def capacity_for(max_sequence_length: int, block: int) -> int:
    """The context length the engine allocates for ``max_sequence_length`` tokens: a
    power of two in blocks."""
    blocks = math.ceil(max_sequence_length / block)
    return block * (1 << max(blocks - 1, 0).bit_length())


def kv_buffer_bytes(*, bytes_per_token: int, block: int, max_sequence_length: int,
                    requests: int, kv_cache_gib: float | None) -> int:
    """Bytes of the engine's KV buffer on one rank for ``requests`` concurrent sequences
    of up to ``max_sequence_length`` tokens."""
    if kv_cache_gib is not None:
        return int(kv_cache_gib * GIB)
    blocks = requests * math.ceil(max_sequence_length / block) + 1  # + the dummy block
    return blocks * block * bytes_per_token
