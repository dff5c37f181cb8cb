"""Checkpoints: megatron-core distributed checkpoints of the policy and training state."""
