"""Hugging Face safetensors checkpoint -> megatron-core distributed checkpoint.

One process, streaming: megatron reports the global layout of the world-size-1 model
(built on ``meta``), the mapping says which HF tensors make each module tensor, and the
writer asks for one stored chunk at a time, which reads just that group's HF tensors.
Everything is validated (architecture, tensor names, shapes) before the output
directory is created. The original ``config.json`` (as ``hf_config.json``), the HF
tensors' dtypes (``hf_dtypes.json``), the ModelConfig (``r1mega_model.yaml``, a
``model:`` section usable as a training-config default) and the tokenizer files are
stored next to the weights, so the checkpoint converts back to the same HF files
without further arguments, and ``r1mega_config.yaml`` (a complete job config: model,
tokenizer, precision, template and ``generation_config.json``'s sampling defaults), so
every command takes the directory as it is.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from r1mega.checkpointing.paths import CONFIG, MODEL_CONFIG
from r1mega.config.from_weights import TOKENIZER_FILES, has_tokenizer, model_directory_config
from r1mega.config.schema import ModelConfig
from r1mega.convert.checks import check_mapping, check_tensors, expected_hf_shapes
from r1mega.convert.errors import ConversionError
from r1mega.convert.files import atomic_output_dir, check_target, copy_assets
from r1mega.convert.hf_reader import HFCheckpointReader
from r1mega.convert.mappings import TensorGroup, groups_for
from r1mega.convert.megatron_layout import model_layout
from r1mega.convert.megatron_writer import write_megatron_checkpoint

HF_CONFIG_NAME = "hf_config.json"
HF_DTYPES_NAME = "hf_dtypes.json"
MODEL_CONFIG_NAME = MODEL_CONFIG
_DTYPES = ("float32", "bfloat16", "float16")


def default_dtype(config: dict[str, Any]) -> str:
    """The checkpoint's own dtype (``dtype`` / ``torch_dtype``), bfloat16 if unknown."""
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if dtype in _DTYPES else "bfloat16"


def _ignorable(config: dict[str, Any], model_cfg: ModelConfig, present: list[str]) -> list[str]:
    """HF tensors that may be present but carry nothing the megatron model needs."""
    out = [n for n in present if n.endswith("rotary_emb.inv_freq")]
    if model_cfg.tie_embeddings:
        out.append("lm_head.weight")  # a tied copy some exporters still write
    declared = int(config.get("num_nextn_predict_layers") or 0)
    if model_cfg.arch == "deepseek_v3" and declared and not model_cfg.mtp_num_layers:
        mtp = re.compile(r"model\.layers\.(\d+)\.")
        out += [n for n in present if (m := mtp.match(n)) and int(m.group(1)) >=
                model_cfg.num_layers]
    return out


def dtype_record(dtypes: dict[str, torch.dtype]) -> dict[str, Any]:
    """The HF tensors' dtypes, compactly: the common one and the exceptions (DeepSeek-V3
    keeps its router bias in float32). megatron keeps norms in float32 whatever the HF
    dtype, so converting back needs this to restore the original dtypes exactly."""
    names = {n: str(d).removeprefix("torch.") for n, d in dtypes.items()}
    counts: dict[str, int] = {}
    for d in names.values():
        counts[d] = counts.get(d, 0) + 1
    common = max(counts, key=counts.__getitem__) if counts else "bfloat16"
    return {"dtype": common, "exceptions": {n: d for n, d in names.items() if d != common}}


class _GroupSource:
    """Module tensor -> value, computing one mapping group at a time (the writer asks
    for the SwiGLU gate and up chunks, or a layer's tensors, back to back)."""

    def __init__(self, reader: HFCheckpointReader, groups: list[TensorGroup]) -> None:
        self.reader = reader
        self.producer = {m: g for g in groups if not g.alias for m in g.megatron}
        self._group: TensorGroup | None = None
        self._values: dict[str, torch.Tensor] = {}

    def __call__(self, name: str) -> torch.Tensor:
        group = self.producer[name]
        if group is not self._group:
            self._group, self._values = None, {}  # free the previous group first
            outputs = group.to_megatron([self.reader.get(n) for n in group.hf])
            self._group, self._values = group, dict(zip(group.megatron, outputs, strict=True))
        return self._values[name]

    def check_aliases(self, groups: list[TensorGroup]) -> None:
        """Warn when an HF copy of a shared tensor differs from the tensor megatron keeps
        (DeepSeek-V3's MTP embedding/head): converting back writes the shared one."""
        for g in groups:
            if g.alias:
                kept = self.producer[g.megatron[0]].hf[0]
                if not self.reader.same_values(kept, g.hf[0]):
                    warnings.warn(f"{g.hf[0]} differs from {kept}; megatron shares one tensor "
                                  f"and keeps {kept}", stacklevel=2)


def convert_hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, dtype: str | None = None,
                           include_mtp: bool = True) -> ModelConfig:
    """Convert the HF checkpoint in ``hf_dir`` into a megatron distributed checkpoint at
    ``out_dir`` (created; must not exist or be empty) loadable at any layout by
    :func:`r1mega.checkpointing.model_io.load_model`. Returns the ModelConfig.

    ``dtype`` (float32 | bfloat16 | float16) defaults to the checkpoint's own dtype;
    FP8 block-quantized weights are dequantized to bfloat16 first.
    """
    check_target(out_dir)
    reader = HFCheckpointReader(hf_dir)
    model_cfg = reader.model_config(include_mtp=include_mtp)
    dtype = dtype or default_dtype(reader.config)
    layout = model_layout(model_cfg, dtype)
    groups = groups_for(model_cfg)
    check_mapping(groups, layout)
    tensors = reader.tensors()
    found = {name: info.shape for name, info in tensors.items()}
    expected = expected_hf_shapes(groups, layout)
    try:
        check_tensors(found, expected, f"HF checkpoint {hf_dir}",
                      _ignorable(reader.config, model_cfg, list(found)))
    except ConversionError as err:
        raise ConversionError(f"{err}{_mtp_hint(reader.config, model_cfg, found)}") from None
    if not has_tokenizer(Path(hf_dir)):
        warnings.warn(f"no tokenizer in {hf_dir} (looked for {' or '.join(TOKENIZER_FILES)}): "
                      "the converted checkpoint has none; jobs then need tokenizer.path",
                      stacklevel=2)

    source = _GroupSource(reader, groups)
    with atomic_output_dir(out_dir) as tmp:
        write_megatron_checkpoint(tmp, layout, source)
        source.check_aliases(groups)
        with open(tmp / HF_CONFIG_NAME, "w") as f:
            json.dump(reader.config, f, indent=2)
        with open(tmp / HF_DTYPES_NAME, "w") as f:
            json.dump(dtype_record({n: tensors[n].dtype for n in expected}), f, indent=2)
        OmegaConf.save(OmegaConf.create({"model": OmegaConf.structured(model_cfg)}),
                       tmp / MODEL_CONFIG_NAME)
        copy_assets(hf_dir, tmp)
        (tmp / CONFIG).write_text(_job_config_yaml(hf_dir, Path(out_dir), model_cfg, dtype))
    return model_cfg


def _mtp_hint(config: dict[str, Any], model_cfg: ModelConfig, found: dict[str, Any]) -> str:
    """The fix for a DeepSeek-V3 whose config.json declares MTP layers it does not hold."""
    if model_cfg.arch != "deepseek_v3" or not model_cfg.mtp_num_layers:
        return ""
    mtp = re.compile(r"model\.layers\.(\d+)\.")
    if any((m := mtp.match(n)) and int(m.group(1)) >= model_cfg.num_layers for n in found):
        return ""
    return (f"\nconfig.json declares num_nextn_predict_layers={model_cfg.mtp_num_layers} but "
            "the checkpoint holds no MTP layer (transformers' save_pretrained drops them): "
            "convert with --no-mtp to leave multi-token prediction out")


def _job_config_yaml(hf_dir: str | Path, out_dir: Path, model_cfg: ModelConfig,
                     dtype: str) -> str:
    """``r1mega_config.yaml`` of a converted checkpoint: a complete job config (model,
    tokenizer files beside the weights, precision, template, generation_config's sampling
    defaults), so that every command takes the directory as it is."""
    import dataclasses

    from r1mega.config.schema import R1MegaConfig

    params_dtype = "float32" if dtype == "float32" else "bfloat16"
    config = model_directory_config(hf_dir, dtype=params_dtype)
    config["tokenizer"]["path"] = str(out_dir.absolute())
    config["checkpoint"]["load"] = str(out_dir.absolute())
    config["model"] = dataclasses.asdict(model_cfg)
    merged = OmegaConf.merge(OmegaConf.structured(R1MegaConfig), config)
    return OmegaConf.to_yaml(merged)


def load_model_config(path: str | Path) -> ModelConfig:
    """The ``model:`` section of an r1mega YAML config (``defaults:`` followed), or a
    file holding just the ModelConfig fields."""
    import dataclasses

    from r1mega.config.load import load_yaml_chain

    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    merged = OmegaConf.structured(ModelConfig)
    for _, data in load_yaml_chain(path):
        if "model" in data:
            merged = OmegaConf.merge(merged, data["model"])
        elif data and set(data) <= fields:
            merged = OmegaConf.merge(merged, data)
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConversionError(f"{path}: model config lacks {', '.join(missing)}")
    return OmegaConf.to_object(merged)  # type: ignore[return-value]
