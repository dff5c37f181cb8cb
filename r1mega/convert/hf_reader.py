"""Lazy, tensor-by-tensor reading of a Hugging Face safetensors checkpoint.

A checkpoint is either ``model.safetensors`` or shards listed by
``model.safetensors.index.json``. Shapes and dtypes come from the shard headers alone,
so a conversion is planned and validated before any tensor data is read.

``safe_open`` lists each shard's tensors (names, shapes, dtypes). The data of one tensor
is then read with a plain positioned read into a tensor of exactly its size, at the
offsets the shard's header gives: ``safe_open`` memory-maps the shard, and the pages
it touches count towards resident memory as long as the mapping is open (measured:
six 256 MB tensors read through one open handle grew RSS by 1.5 GB; reopening per
tensor still holds the mapped pages next to the copy while reading, which put the peak
of converting the 2-layer 671B-shape slice at 3 x its largest tensor instead of 2 x).

FP8 block-quantized weights (DeepSeek-V3's release) are dequantized on read, see
:mod:`r1mega.convert.fp8`; their ``*_scale_inv`` companions are consumed, not listed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from r1mega.convert.errors import ConversionError
from r1mega.convert.fp8 import DEFAULT_BLOCK, SCALE_SUFFIX, is_fp8, scale_shape, weight_dequant

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it looks like, as stored."""

    file: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    start: int = 0  # byte range in the file
    end: int = 0


#: Largest safetensors header accepted: the 671B release's largest is under 200 KB.
MAX_HEADER_BYTES = 100 * 2**20
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
                "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _data_ranges(path: Path) -> dict[str, tuple[int, int]]:
    """Absolute byte range of each tensor in a safetensors file, from its header
    (8-byte little-endian header size, JSON header, data; offsets relative to the data).

    Every length in the header is checked against the file's size before anything is
    read or allocated: a truncated shard, or a crafted header claiming petabytes, is a
    :class:`ConversionError` naming the file, not a MemoryError or a library traceback."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 8:
            raise ConversionError(f"{path}: {size} bytes is too short for a safetensors "
                                  "file (truncated?)")
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise ConversionError(f"{path}: the safetensors header claims {header_len} bytes "
                                  f"but the file has {size} (corrupt or truncated)")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: the safetensors header is not valid JSON ({e})"
                              ) from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: the safetensors header is not a JSON object")
    base = 8 + header_len
    ranges = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = (int(x) for x in meta["data_offsets"])
            numel = 1
            for dim in meta["shape"]:
                numel *= int(dim)
            itemsize = _DTYPE_BYTES[meta["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{path}: malformed header entry for tensor {name}: "
                                  f"{str(meta)[:200]}") from None
        if not 0 <= start <= end or end - start != numel * itemsize:
            raise ConversionError(f"{path}: tensor {name} has {end - start} bytes of data "
                                  f"for shape {meta['shape']} {meta['dtype']}")
        if base + end > size:
            raise ConversionError(f"{path} is truncated: tensor {name} ends at byte "
                                  f"{base + end}, the file has {size}")
        ranges[name] = (base + start, base + end)
    return ranges


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; a malformed file is a :class:`ConversionError`."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} does not hold a JSON object")
    return data


class HFCheckpointReader:
    """Tensor names, shapes and lazily read values of one HF checkpoint directory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                    isinstance(v, str) for v in weight_map.values()):
                raise ConversionError(f"{index} has no weight_map of tensor -> file names")
            files = sorted(set(weight_map.values()))
        elif (self.directory / SINGLE_NAME).exists():
            files = [SINGLE_NAME]
        else:
            raise ConversionError(
                f"{self.directory} has neither {INDEX_NAME} nor {SINGLE_NAME}")
        self.config: dict[str, Any] = self._read_config()
        self.fp8_block = self._fp8_block()
        self.stored: dict[str, TensorInfo] = {}
        for name in files:
            path = self.directory / name
            if not path.exists():
                raise ConversionError(f"{INDEX_NAME} lists {name}, which is missing")
            ranges = _data_ranges(path)  # checks the file before safetensors reads it
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        sl = f.get_slice(key)
                        self.stored[key] = TensorInfo(name, tuple(sl.get_shape()),
                                                      _ST_DTYPES[sl.get_dtype()], *ranges[key])
            except (SafetensorError, KeyError) as e:
                raise ConversionError(f"{path} cannot be read as safetensors: {e}") from None

    def _read_config(self) -> dict[str, Any]:
        path = self.directory / "config.json"
        if not path.exists():
            raise ConversionError(f"{self.directory} has no config.json")
        return read_json(path)

    def model_config(self, include_mtp: bool = True) -> Any:
        """The ModelConfig of this checkpoint's config.json; a missing or malformed field
        is a ConversionError naming the file."""
        from r1mega.convert.hf_config import model_config_from_hf

        try:
            return model_config_from_hf(self.config, include_mtp=include_mtp)
        except ConversionError as e:
            path = self.directory / "config.json"
            raise ConversionError(f"{path}: {str(e).removeprefix('config.json ')}") from None

    def _fp8_block(self) -> tuple[int, int]:
        quant = self.config.get("quantization_config") or {}
        block = quant.get("weight_block_size") or DEFAULT_BLOCK
        return (int(block[0]), int(block[1]))

    def is_quantized(self, name: str) -> bool:
        return is_fp8(self.stored[name].dtype) and name + SCALE_SUFFIX in self.stored

    def tensors(self) -> dict[str, TensorInfo]:
        """Logical tensors: FP8 weights appear as bfloat16, their scales are hidden."""
        out: dict[str, TensorInfo] = {}
        scales = {n + SCALE_SUFFIX for n in self.stored if self.is_quantized(n)}
        for name, info in self.stored.items():
            if name in scales:
                continue
            if self.is_quantized(name):
                expected = scale_shape(info.shape, self.fp8_block)
                got = self.stored[name + SCALE_SUFFIX].shape
                if tuple(got) != expected:
                    raise ConversionError(
                        f"shape mismatch: {name + SCALE_SUFFIX} has shape {tuple(got)}, "
                        f"expected {expected} for {name} {info.shape} in "
                        f"{self.fp8_block} blocks")
                info = TensorInfo(info.file, info.shape, torch.bfloat16, info.start, info.end)
            elif is_fp8(info.dtype):
                raise ConversionError(f"{name} is {info.dtype} without {name + SCALE_SUFFIX}: "
                                      "cannot dequantize it")
            out[name] = info
        return out

    def _read(self, name: str) -> torch.Tensor:
        info = self.stored[name]
        data = torch.empty(info.end - info.start, dtype=torch.uint8)
        with open(self.directory / info.file, "rb") as f:
            f.seek(info.start)
            if f.readinto(memoryview(data.numpy())) != data.numel():
                raise ConversionError(f"{info.file} is truncated at tensor {name}")
        return data.view(info.dtype).reshape(info.shape)

    def same_values(self, a: str, b: str, block: int = 1 << 26) -> bool:
        """Whether two stored tensors are identical, compared block by block (the 1.7 GiB
        embedding copies of DeepSeek-V3's MTP layer need no memory)."""
        ia, ib = self.stored[a], self.stored[b]
        if (ia.shape, ia.dtype, ia.end - ia.start) != (ib.shape, ib.dtype, ib.end - ib.start):
            return False
        with open(self.directory / ia.file, "rb") as fa, open(self.directory / ib.file,
                                                               "rb") as fb:
            fa.seek(ia.start)
            fb.seek(ib.start)
            for pos in range(ia.start, ia.end, block):
                size = min(block, ia.end - pos)
                if fa.read(size) != fb.read(size):
                    return False
        return True

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` (FP8 weights dequantized to bfloat16)."""
        if name not in self.stored:
            raise ConversionError(f"missing tensor {name}")
        tensor = self._read(name)
        if self.is_quantized(name):
            tensor = weight_dequant(tensor, self._read(name + SCALE_SUFFIX), self.fp8_block)
        return tensor
