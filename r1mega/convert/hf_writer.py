"""Write Hugging Face safetensors checkpoints one tensor at a time.

``safetensors.torch.save_file`` needs a whole shard in memory. The converter knows every
output tensor's name, shape and dtype before reading any data (from the megatron
checkpoint's metadata), so it plans the shards up front, writes each file's header
first and then streams the tensors' bytes in header order: memory stays at one tensor
group however large the shard. The file format (8-byte little-endian header length,
JSON header with ``data_offsets`` relative to the byte buffer, header padded with spaces
to 8 bytes) is read back by ``safetensors`` and ``transformers`` in the tests.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

INDEX_NAME = "model.safetensors.index.json"

_ST_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes of ``5GB`` / ``500MiB`` / ``1000000`` (decimal units as HF uses them)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", size)
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot parse size {size!r} (e.g. 5GB, 500MiB, 1000000)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * torch.empty((), dtype=self.dtype).element_size()


def shard_file_names(count: int) -> list[str]:
    """HF's names: ``model.safetensors`` alone, else ``model-0000i-of-0000n.safetensors``."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class SafetensorsStreamWriter:
    """One ``.safetensors`` file whose tensors are known in advance, written in order."""

    def __init__(self, path: str | Path, tensors: list[PlannedTensor],
                 metadata: dict[str, str] | None = None) -> None:
        header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for t in tensors:
            header[t.name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._pending = list(tensors)
        self._file: BinaryIO = open(path, "wb")  # closed in close()
        self._file.write(len(raw).to_bytes(8, "little"))
        self._file.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor's bytes."""
        expected = self._pending.pop(0)
        if (name, tuple(tensor.shape), tensor.dtype) != (expected.name, expected.shape,
                                                         expected.dtype):
            raise AssertionError(f"writing {name} {tuple(tensor.shape)} {tensor.dtype}, planned "
                                 f"{expected}")
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))

    def abort(self) -> None:
        """Close without the completeness check (the caller is failing anyway)."""
        self._file.close()

    def close(self) -> None:
        self._file.close()
        if self._pending:
            raise AssertionError(f"{len(self._pending)} planned tensors were not written")


def write_index(directory: str | Path, weight_map: dict[str, str], total_size: int) -> None:
    """``model.safetensors.index.json`` for a sharded checkpoint."""
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    with open(Path(directory) / INDEX_NAME, "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
