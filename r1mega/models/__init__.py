"""Model providers: megatron-core GPTModels for dense bases and DeepSeek-V3."""

from r1mega.models.provider import (
    build_generation_model,
    build_model,
    build_transformer_config,
    model_stage_flags,
)
from r1mega.models.specs import te_available, use_transformer_engine

__all__ = [
    "build_generation_model",
    "build_model",
    "build_transformer_config",
    "model_stage_flags",
    "te_available",
    "use_transformer_engine",
]
