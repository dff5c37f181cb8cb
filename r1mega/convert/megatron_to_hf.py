"""megatron-core distributed checkpoint (saved at any layout) -> Hugging Face directory.

The model is described by, in order of precedence: an explicit HF ``config.json`` (or a
directory holding one), an explicit ModelConfig (an r1mega YAML), or the
``hf_config.json`` that :func:`~r1mega.convert.hf_to_megatron.convert_hf_to_megatron`
stored with the checkpoint. megatron reports the global layout of that model; every
tensor it needs is checked against the checkpoint's metadata before the output exists.
The HF tensors are planned (names, shapes, dtypes) into safetensors shards up front and
streamed group by group: memory holds one layer's or one expert's tensors, not a shard.
DeepSeek-V3 MTP layers come back as ``model.layers.{L+k}.*`` exactly as they went in,
including the copies of the embedding and output head.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from r1mega.config.schema import ModelConfig
from r1mega.convert.checks import check_mapping, expected_hf_shapes
from r1mega.convert.errors import ConversionError
from r1mega.convert.files import atomic_output_dir, check_target, copy_assets
from r1mega.convert.hf_config import hf_config_from_model_config, model_config_from_hf
from r1mega.convert.hf_to_megatron import (
    HF_CONFIG_NAME,
    HF_DTYPES_NAME,
    MODEL_CONFIG_NAME,
    load_model_config,
)
from r1mega.convert.hf_writer import (
    PlannedTensor,
    SafetensorsStreamWriter,
    parse_size,
    shard_file_names,
    write_index,
)
from r1mega.convert.mappings import TensorGroup, groups_for
from r1mega.convert.megatron_layout import model_layout
from r1mega.convert.megatron_reader import MegatronCheckpointReader

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NAMES = {v: k for k, v in _DTYPES.items()}


def _hf_config_dict(path: str | Path) -> tuple[dict[str, Any], Path]:
    """(config dict, directory whose assets to copy) from a config.json or its directory."""
    p = Path(path)
    file = p / "config.json" if p.is_dir() else p
    if not file.is_file():
        raise ConversionError(f"no HF config at {file}")
    with open(file) as f:
        return json.load(f), file.parent


def _resolve_config(megatron_dir: Path, hf_config: str | Path | None,
                    model_config: ModelConfig | str | Path | None
                    ) -> tuple[ModelConfig, dict[str, Any] | None, list[Path]]:
    """(ModelConfig, HF config to write or None to synthesize one, dirs with tokenizer
    files). Explicit arguments win; otherwise the files hf-to-megatron stored."""
    assets = [megatron_dir]
    if isinstance(model_config, str | Path):
        model_config = load_model_config(model_config)
    if hf_config is not None:
        config, where = _hf_config_dict(hf_config)
        assets.append(where)
        return model_config or model_config_from_hf(config), config, assets
    if model_config is not None:
        return model_config, None, assets
    if not (megatron_dir / HF_CONFIG_NAME).is_file():
        raise ConversionError(
            f"{megatron_dir} has no {HF_CONFIG_NAME}: pass the model's HF config.json "
            "(hf_config) or its r1mega YAML config (model_config)")
    config, _ = _hf_config_dict(megatron_dir / HF_CONFIG_NAME)
    stored = megatron_dir / MODEL_CONFIG_NAME  # as converted (e.g. without MTP)
    model_cfg = load_model_config(stored) if stored.is_file() else model_config_from_hf(config)
    return model_cfg, config, assets


def _recorded_dtypes(megatron_dir: Path) -> tuple[str, dict[str, str]] | None:
    """(common dtype, exceptions) of the HF tensors this checkpoint was converted from."""
    path = megatron_dir / HF_DTYPES_NAME
    if not path.is_file():
        return None
    with open(path) as f:
        record = json.load(f)
    return record["dtype"], record["exceptions"]


def _output_config(config: dict[str, Any] | None, model_cfg: ModelConfig, dtype: str
                   ) -> dict[str, Any]:
    """config.json of the output: the original one (weights are no longer FP8-quantized,
    the dtype is the written one, MTP layers as many as written) or a synthesized one."""
    if config is None:
        return hf_config_from_model_config(model_cfg, dtype)
    out = {k: v for k, v in config.items() if k != "quantization_config"}
    out["dtype"] = dtype
    if "torch_dtype" in out:
        out["torch_dtype"] = dtype
    if model_cfg.arch == "deepseek_v3":
        out["num_nextn_predict_layers"] = model_cfg.mtp_num_layers
    return out


def convert_megatron_to_hf(megatron_dir: str | Path, out_dir: str | Path,
                           hf_config: str | Path | None = None,
                           model_config: ModelConfig | str | Path | None = None,
                           dtype: str | None = None, max_shard_size: int | str = "5GB",
                           include_mtp: bool = True) -> ModelConfig:
    """Write the weights of ``megatron_dir`` (a weights-only or training checkpoint,
    saved at any TP/PP/EP layout) as an HF checkpoint ``out_dir`` that
    ``transformers`` loads with ``from_pretrained``. Returns the ModelConfig.

    ``dtype`` defaults to each tensor's dtype in the HF checkpoint this one was converted
    from (recorded in ``hf_dtypes.json``), else to the stored dtype (megatron keeps norms
    in float32); ``include_mtp=False`` leaves DeepSeek-V3's MTP layers out (and sets
    ``num_nextn_predict_layers`` to 0).
    """
    check_target(out_dir)
    if dtype is not None and dtype not in _DTYPES:
        raise ConversionError(f"dtype {dtype!r}: use one of {sorted(_DTYPES)}")
    megatron_dir = Path(megatron_dir)
    reader = MegatronCheckpointReader(megatron_dir)
    model_cfg, config, asset_dirs = _resolve_config(megatron_dir, hf_config, model_config)
    if not include_mtp:
        model_cfg.mtp_num_layers = 0
    layout = model_layout(model_cfg, "float32")  # keys and shapes only; data keeps its dtype
    reader.check(layout)
    groups = groups_for(model_cfg)
    check_mapping(groups, layout)
    shapes = expected_hf_shapes(groups, layout)

    recorded = _recorded_dtypes(megatron_dir)

    def out_dtype(group: TensorGroup, name: str) -> torch.dtype:
        if dtype is not None:
            return _DTYPES[dtype]
        original = getattr(torch, recorded[1].get(name, recorded[0]), None) if recorded else None
        if isinstance(original, torch.dtype):
            return original
        return reader.dtype(layout.tensors[group.megatron[0]].chunks[0].key)

    # Shards of whole groups, in HF order, each at most max_shard_size (unless one group
    # alone is larger).
    limit = parse_size(max_shard_size)
    shards: list[list[tuple[TensorGroup, list[PlannedTensor]]]] = [[]]
    size = 0
    for g in groups:
        planned = [PlannedTensor(n, shapes[n], out_dtype(g, n)) for n in g.hf]
        nbytes = sum(p.nbytes for p in planned)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((g, planned))
        size += nbytes
    names = shard_file_names(len(shards))
    if dtype is not None or recorded is not None:
        written_dtype = dtype or recorded[0]  # type: ignore[index]
    else:  # the most common dtype written
        counts: dict[torch.dtype, int] = {}
        for shard in shards:
            for _, planned in shard:
                for p in planned:
                    counts[p.dtype] = counts.get(p.dtype, 0) + p.nbytes
        written_dtype = _NAMES.get(max(counts, key=counts.__getitem__), "bfloat16")

    with atomic_output_dir(out_dir) as tmp:
        weight_map: dict[str, str] = {}
        total = 0
        for file_name, shard in zip(names, shards, strict=True):
            writer = SafetensorsStreamWriter(tmp / file_name,
                                             [p for _, planned in shard for p in planned])
            try:
                for g, planned in shard:
                    values = g.to_hf([reader.read(layout.tensors[m]) for m in g.megatron])
                    for p, value in zip(planned, values, strict=True):
                        writer.write(p.name, value.to(p.dtype))
                        weight_map[p.name] = file_name
                        total += p.nbytes
            except BaseException:
                writer.abort()
                raise
            writer.close()
        if len(names) > 1:
            write_index(tmp, weight_map, total)
        for directory in asset_dirs:
            copy_assets(directory, tmp)
        with open(tmp / "config.json", "w") as f:
            json.dump(_output_config(config, model_cfg, written_dtype), f, indent=2)
            f.write("\n")
    return model_cfg
