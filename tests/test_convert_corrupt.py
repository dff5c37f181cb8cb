"""`r1mega convert` on corrupt input: exit status 2 and one line naming the file and what
is wrong, never a traceback; lengths in a file's header are checked against the file's
size before anything is allocated."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from r1mega.cli import main
from tests.hf_models import save_tiny_hf_model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny HF Llama and its conversion to a megatron checkpoint."""
    root = tmp_path_factory.mktemp("corrupt")
    save_tiny_hf_model("llama", root / "hf")
    assert main(["convert", "hf-to-megatron", str(root / "hf"), str(root / "meg")]) == 0
    return root / "hf", root / "meg"


def _header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _write_header(path: Path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _offsets_past_end(d: Path) -> None:
    header, body = _header(d / "model.safetensors")
    name = max((k for k in header if k != "__metadata__"),
               key=lambda k: header[k]["data_offsets"][1])  # the last tensor in the file
    start, end = header[name]["data_offsets"]
    assert header[name]["dtype"] == "F32"
    header[name]["data_offsets"][1] = end + 4096  # a consistent header, a short file
    header[name]["shape"] = [(end + 4096 - start) // 4]
    _write_header(d / "model.safetensors", header, body)


def _huge_header(d: Path) -> None:
    path = d / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", 2**30)  # allocatable: the old reader allocated it
    path.write_bytes(bytes(data))


HF_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated shard": (lambda d: os.truncate(d / "model.safetensors",
                                              (d / "model.safetensors").stat().st_size - 1000),
                        "model.safetensors is truncated: tensor "),
    "malformed config.json": (lambda d: (d / "config.json").write_text('{"hidden_size": '),
                              "config.json is not valid JSON"),
    "config.json without a field": (
        lambda d: (d / "config.json").write_text(json.dumps(
            {k: v for k, v in json.loads((d / "config.json").read_text()).items()
             if k != "hidden_size"})),
        "config.json: lacks 'hidden_size'"),
    "header length past the end": (_huge_header,
                                   "model.safetensors: the safetensors header claims 1073741824"
                                   " bytes but the file has"),
    "header is not JSON": (lambda d: _write_header(d / "model.safetensors", {}, b"")
                           or (d / "model.safetensors").write_bytes(
                               struct.pack("<Q", 4) + b"{{{{"),
                           "the safetensors header is not valid JSON"),
    "two-byte file": (lambda d: (d / "model.safetensors").write_bytes(b"\x01\x02"),
                      "model.safetensors: 2 bytes is too short for a safetensors file"),
    "tensor data past the end": (_offsets_past_end, "model.safetensors is truncated: tensor"),
    "malformed index": (lambda d: (d / "model.safetensors.index.json").write_text("{x"),
                        "model.safetensors.index.json is not valid JSON"),
}

MEGATRON_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated shard": (lambda d: os.truncate(d / "__0_0.distcp", 1000),
                        "__0_0.distcp is truncated: 1000 bytes, the checkpoint's metadata "
                        "needs"),
    "garbage metadata": (lambda d: (d / ".metadata").write_bytes(b"\x80garbage"),
                         ".metadata cannot be read"),
    "malformed hf_config.json": (lambda d: (d / "hf_config.json").write_text("{oops"),
                                 "hf_config.json is not valid JSON"),
}


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("case", list(HF_CASES))
def test_corrupt_hf_checkpoint(checkpoints: tuple[Path, Path], tmp_path: Path, case: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    hf, _ = checkpoints
    broken = tmp_path / "hf"
    shutil.copytree(hf, broken)
    corrupt, expected = HF_CASES[case]
    corrupt(broken)
    capsys.readouterr()
    tracemalloc.start()
    try:
        code = main(["convert", "hf-to-megatron", str(broken), str(tmp_path / "out")])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 2
    line = _one_line_error(capsys)
    assert line.startswith(f"r1mega convert: error: {broken}") and expected in line, line
    assert peak < 64 * 2**20, f"{peak} bytes allocated"  # nothing sized by the header
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", list(MEGATRON_CASES))
def test_corrupt_megatron_checkpoint(checkpoints: tuple[Path, Path], tmp_path: Path,
                                     case: str, capsys: pytest.CaptureFixture[str]) -> None:
    _, meg = checkpoints
    broken = tmp_path / "meg"
    shutil.copytree(meg, broken)
    corrupt, expected = MEGATRON_CASES[case]
    corrupt(broken)
    capsys.readouterr()
    assert main(["convert", "megatron-to-hf", str(broken), str(tmp_path / "out")]) == 2
    line = _one_line_error(capsys)
    assert line.startswith(f"r1mega convert: error: {broken}") and expected in line, line
    assert not (tmp_path / "out").exists()
