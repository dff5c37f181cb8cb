"""Constants of the rollout engine that configuration checks need (torch-free)."""

# megatron-core's FlashMLA decode path needs 64-token KV blocks (asserted by its context).
MLA_BLOCK_TOKENS = 64
# megatron-core's default block; flash-attention 2's paged kernels need multiples of 256.
DENSE_BLOCK_TOKENS = 256
