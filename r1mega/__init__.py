"""r1mega: DeepSeek-R1(-Zero)-style GRPO on Megatron-Core."""

__version__ = "0.1.0"
