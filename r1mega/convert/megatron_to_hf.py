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

Any training checkpoint exports: a run's ``save_dir`` means its newest step, and a step
directory's stored job config (``r1mega_config.yaml``) describes the model; the chain of
``checkpoint.load`` it was started from (a Hugging Face directory, a converted
checkpoint, an earlier run) supplies the original ``config.json``, tokenizer files, chat
template and ``generation_config.json`` (one is written from the tokenizer's special
ids when none is found), so the directory loads in ``transformers`` and generates.

``fp8=True`` (DeepSeek-V3) writes the release's FP8 format: the decoder layers' linear
weights as float8_e4m3fn in 128x128 blocks (or the source's ``weight_block_size``) with
``<name>_scale_inv``, everything else bfloat16 (the router bias float32), and
``quantization_config`` in ``config.json``. The blocks are
:func:`r1mega.models.fp8_blocks.block_quantize` of the bfloat16 weights, whose
dequantization (:func:`r1mega.convert.fp8.weight_dequant`) is what loaders compute.
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
from r1mega.convert.fp8 import (
    DEFAULT_BLOCK,
    SCALE_SUFFIX,
    is_release_fp8_weight,
    quantization_config,
    scale_shape,
)
from r1mega.convert.hf_config import hf_config_from_model_config, model_config_from_hf
from r1mega.convert.hf_reader import read_json
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
from r1mega.models.fp8_blocks import block_quantize

GENERATION_CONFIG = "generation_config.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NAMES = {v: k for k, v in _DTYPES.items()}


def _hf_config_dict(path: str | Path) -> tuple[dict[str, Any], Path]:
    """(config dict, directory whose assets to copy) from a config.json or its directory."""
    p = Path(path)
    file = p / "config.json" if p.is_dir() else p
    if not file.is_file():
        raise ConversionError(f"no HF config at {file}")
    return read_json(file), file.parent


def _origins(megatron_dir: Path) -> tuple[Path | None, list[Path]]:
    """(the stored job config, directories the weights came from): for a training
    checkpoint, its ``checkpoint.load`` followed back through earlier runs to the
    converted checkpoint or HF directory it started from, and its tokenizer directory."""
    from omegaconf import OmegaConf

    from r1mega.checkpointing.paths import CONFIG, WeightSourceError, resolve_weight_source

    job_config = megatron_dir / CONFIG if (megatron_dir / CONFIG).is_file() else None
    dirs: list[Path] = []
    config_file = job_config
    for _ in range(16):  # a chain of stages, each started from the previous one's save_dir
        if config_file is None:
            break
        stored = OmegaConf.load(config_file)
        tokenizer = stored.get("tokenizer") or {}
        if tokenizer.get("type") == "hf" and tokenizer.get("path"):
            dirs.append(Path(tokenizer["path"]))
        load = (stored.get("checkpoint") or {}).get("load")
        if not load or str(load).startswith("warm_start:"):
            break
        try:
            source = resolve_weight_source(load)
        except WeightSourceError:
            break
        dirs.append(source.path)
        if source.checkpoint is None or source.checkpoint == megatron_dir:
            break
        config_file = source.config_file
    return job_config, [d for d in dirs if d.is_dir()]


def _origin_hf_config(dirs: list[Path]) -> dict[str, Any] | None:
    """The original ``config.json`` of the first origin that has one: a converted
    checkpoint's stored copy or an HF directory's own."""
    from r1mega.checkpointing.paths import is_hf_model_dir

    for d in dirs:
        if (d / HF_CONFIG_NAME).is_file():
            return _hf_config_dict(d / HF_CONFIG_NAME)[0]
        if is_hf_model_dir(d):
            return _hf_config_dict(d)[0]
    return None


def _resolve_config(megatron_dir: Path, hf_config: str | Path | None,
                    model_config: ModelConfig | str | Path | None
                    ) -> tuple[ModelConfig, dict[str, Any] | None, list[Path]]:
    """(ModelConfig, HF config to write or None to synthesize one, dirs with tokenizer
    files). Explicit arguments win; then the files hf-to-megatron stored; then a training
    checkpoint's stored config and where its weights came from."""
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
        job_config, origins = _origins(megatron_dir)
        if job_config is None:
            raise ConversionError(
                f"{megatron_dir} has no {HF_CONFIG_NAME} and no r1mega_config.yaml: pass the "
                "model's HF config.json (hf_config) or its r1mega YAML config (model_config)")
        model_cfg = load_model_config(job_config)
        original = _origin_hf_config(origins)
        if original is not None and model_config_from_hf(
                original, include_mtp=bool(model_cfg.mtp_num_layers)).arch != model_cfg.arch:
            original = None
        return model_cfg, original, assets + origins
    config, _ = _hf_config_dict(megatron_dir / HF_CONFIG_NAME)
    stored = megatron_dir / MODEL_CONFIG_NAME  # as converted (e.g. without MTP)
    model_cfg = load_model_config(stored) if stored.is_file() else model_config_from_hf(config)
    return model_cfg, config, assets


def _recorded_dtypes(megatron_dir: Path) -> tuple[str, dict[str, str]] | None:
    """(common dtype, exceptions) of the HF tensors this checkpoint was converted from."""
    path = megatron_dir / HF_DTYPES_NAME
    if not path.is_file():
        return None
    record = read_json(path)
    if not isinstance(record.get("dtype"), str) or not isinstance(record.get("exceptions"), dict):
        raise ConversionError(f"{path} is malformed: expected dtype and exceptions")
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


def _checkpoint_dir(path: str | Path) -> Path:
    """The megatron checkpoint ``path`` names (a run's save_dir: its newest step)."""
    from r1mega.checkpointing.paths import WeightSourceError, resolve_weight_source

    try:
        source = resolve_weight_source(path)
    except WeightSourceError as err:
        raise ConversionError(str(err)) from None
    if source.checkpoint is None:
        raise ConversionError(f"{path} is not a megatron checkpoint (it is a "
                              f"{source.kind.value} source)")
    return source.checkpoint


def _generation_config(out: Path, config: dict[str, Any]) -> None:
    """``generation_config.json`` from the special ids of the config or the tokenizer,
    when none travelled with the weights."""
    if (out / GENERATION_CONFIG).is_file():
        return
    ids = {k: config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if ids["eos_token_id"] is None and (out / "tokenizer_config.json").is_file():
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
            ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                   "pad_token_id": tok.pad_token_id}
        except Exception:  # noqa: BLE001 - a tokenizer transformers cannot read: no ids
            pass
    record = {k: v for k, v in ids.items() if v is not None}
    with open(out / GENERATION_CONFIG, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")


def convert_megatron_to_hf(megatron_dir: str | Path, out_dir: str | Path,
                           hf_config: str | Path | None = None,
                           model_config: ModelConfig | str | Path | None = None,
                           dtype: str | None = None, max_shard_size: int | str = "5GB",
                           include_mtp: bool = True, fp8: bool = False) -> ModelConfig:
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
    megatron_dir = _checkpoint_dir(megatron_dir)
    reader = MegatronCheckpointReader(megatron_dir)
    model_cfg, config, asset_dirs = _resolve_config(megatron_dir, hf_config, model_config)
    if not include_mtp:
        model_cfg.mtp_num_layers = 0
    if fp8 and model_cfg.arch != "deepseek_v3":
        raise ConversionError(f"fp8: the FP8 block format is DeepSeek-V3's release format, "
                              f"not {model_cfg.arch}'s")
    block = tuple((config or {}).get("quantization_config", {}).get("weight_block_size")
                  or DEFAULT_BLOCK)
    layout = model_layout(model_cfg, "float32")  # keys and shapes only; data keeps its dtype
    reader.check(layout)
    groups = groups_for(model_cfg)
    check_mapping(groups, layout)
    shapes = expected_hf_shapes(groups, layout)

    recorded = _recorded_dtypes(megatron_dir)

    def out_dtype(group: TensorGroup, name: str) -> torch.dtype:
        if fp8:
            keep32 = name.endswith("e_score_correction_bias")  # float32 in the release
            return torch.float32 if keep32 else torch.bfloat16
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
        planned = []
        for n in g.hf:
            if fp8 and is_release_fp8_weight(n):
                planned += [PlannedTensor(n, shapes[n], torch.float8_e4m3fn),
                            PlannedTensor(n + SCALE_SUFFIX, scale_shape(shapes[n], block),
                                          torch.float32)]
            else:
                planned.append(PlannedTensor(n, shapes[n], out_dtype(g, n)))
        nbytes = sum(p.nbytes for p in planned)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((g, planned))
        size += nbytes
    names = shard_file_names(len(shards))
    if fp8:
        written_dtype = "bfloat16"
    elif dtype is not None or recorded is not None:
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
                    by_name = {p.name: p for p in planned}
                    for name, value in zip(g.hf, values, strict=True):
                        for stored, data in _stored_tensors(name, value, fp8, block):
                            p = by_name[stored]
                            writer.write(p.name, data.to(p.dtype))
                            weight_map[p.name] = file_name
                            total += p.nbytes
            except BaseException:
                writer.abort()
                raise
            writer.close()
        if len(names) > 1:
            write_index(tmp, weight_map, total)
        for directory in reversed(asset_dirs):  # the checkpoint's own files win
            copy_assets(directory, tmp)
        out_config = _output_config(config, model_cfg, written_dtype)
        if fp8:
            out_config["quantization_config"] = quantization_config(block)  # type: ignore[arg-type]
        with open(tmp / "config.json", "w") as f:
            json.dump(out_config, f, indent=2)
            f.write("\n")
        _generation_config(tmp, out_config)
    return model_cfg


def _stored_tensors(name: str, value: torch.Tensor, fp8: bool, block: tuple[int, ...]
                    ) -> list[tuple[str, torch.Tensor]]:
    """What HF tensor ``name`` is written as: itself, or (FP8) the block quantization of
    its bfloat16 value and the scales."""
    if fp8 and is_release_fp8_weight(name):
        q, scale_inv = block_quantize(value.to(torch.bfloat16), (block[0], block[1]))
        return [(name, q), (name + SCALE_SUFFIX, scale_inv)]
    return [(name, value)]
