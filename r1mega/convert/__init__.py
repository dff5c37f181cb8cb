"""Checkpoint conversion between Hugging Face safetensors and megatron-core distributed
checkpoints (Llama, Qwen2, DeepSeek-V3 incl. FP8 release weights and MTP layers).

* :func:`convert_hf_to_megatron` streams an HF checkpoint into a torch_dist checkpoint
  that :func:`r1mega.checkpointing.model_io.load_model` loads at any TP/PP/EP layout.
* :func:`convert_megatron_to_hf` streams a checkpoint saved at any layout back into an
  HF directory that ``transformers`` loads.
* :func:`model_config_from_hf` maps ``config.json`` to the project's ModelConfig.

Modules: ``hf_config`` (configs), ``hf_reader`` / ``fp8`` (reading HF),
``mappings`` (tensor correspondences per architecture), ``megatron_layout`` (global
keys from megatron), ``megatron_writer`` / ``megatron_reader`` (torch_dist I/O),
``hf_writer`` (safetensors shards), ``files`` (atomic outputs, tokenizer files),
``cli`` (the ``r1mega convert`` subcommands).

Names are imported lazily so that ``r1mega --help`` does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConversionError": "r1mega.convert.errors",
    "SUPPORTED_ARCHITECTURES": "r1mega.convert.hf_config",
    "hf_config_from_model_config": "r1mega.convert.hf_config",
    "model_config_from_hf": "r1mega.convert.hf_config",
    "convert_hf_to_megatron": "r1mega.convert.hf_to_megatron",
    "load_model_config": "r1mega.convert.hf_to_megatron",
    "convert_megatron_to_hf": "r1mega.convert.megatron_to_hf",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'r1mega.convert' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
