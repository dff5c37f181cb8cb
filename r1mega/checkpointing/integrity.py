"""Checkpoints that survive power loss, torn writes and corruption (no torch needed).

A step directory is *complete* when its marker ``r1mega_meta.json`` exists; the marker is
written last. That alone is not enough:

* **durability**: without ``fsync`` a power loss can leave the marker on disk beside
  shards whose data never left the page cache. Every file is fsynced by the rank that
  wrote it, then the manifest, the marker and the directories, in that order, before the
  directory is published under its final name (:func:`fsync_path`);
* **integrity**: the manifest ``r1mega_manifest.json`` records every file's size and
  CRC-32 at save time, and the marker records the manifest's CRC-32. At load the files
  are checked against it (:func:`verify_checkpoint`), split over the ranks so each file
  is read once. CRC-32 catches truncation, torn and zeroed blocks and bit rot (not
  tampering, which is not the threat here) at several GB/s;
* **replacement**: re-saving a step renames the old directory to ``step_N.replaced``
  before the new one takes its name, and deletes it only afterwards, so at every instant
  one complete copy exists under a name
  :func:`~r1mega.checkpointing.paths.complete_steps` recognises;
* **fallback**: a checkpoint that fails the check is reported, renamed to
  ``step_N.corrupt`` (kept for inspection, never picked again) and the next older
  complete one is tried, so a requeued job resumes instead of crashing the same way
  forever (:func:`set_aside`).

Checkpoints written before manifests existed (no ``format`` in the marker) load without
the check.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from r1mega.checkpointing.paths import CORRUPT, META, REPLACED

__all__ = [
    "MANIFEST",
    "file_record",
    "fsync_path",
    "owned_files",
    "read_meta",
    "seal_checkpoint",
    "set_aside",
    "verify_checkpoint",
    "verify_files",
]

MANIFEST = "r1mega_manifest.json"
FORMAT = 2  # marker format: 2 = with a manifest
_SHARD = re.compile(r"__(\d+)_\d+\.distcp")  # megatron torch_dist: __<rank>_<n>.distcp
_CHUNK = 1 << 24


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to stable storage."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def file_record(path: Path) -> dict[str, int]:
    """Size and CRC-32 of one file."""
    return {"size": path.stat().st_size, "crc32": _crc32(path)}


def owned_files(directory: Path, rank: int) -> list[Path]:
    """The files of ``directory`` that ``rank`` wrote: its ``__<rank>_<n>.distcp`` shards,
    and for rank 0 every file that is not a shard (megatron's metadata, the config)."""
    mine = []
    for path in sorted(directory.iterdir()):
        if not path.is_file() or path.name in (META, MANIFEST):
            continue
        shard = _SHARD.fullmatch(path.name)
        if (shard is not None and int(shard.group(1)) == rank) or (shard is None and rank == 0):
            mine.append(path)
    return mine


def sync_and_record(paths: Iterable[Path]) -> dict[str, dict[str, int]]:
    """fsync each file and return its record, keyed by name."""
    records = {}
    for path in paths:
        fsync_path(path)
        records[path.name] = file_record(path)
    return records


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def seal_checkpoint(directory: Path, step: int, world_size: int,
                    records: dict[str, dict[str, int]] | None = None) -> None:
    """Write the manifest and then the completion marker of ``directory`` (rank 0).

    ``records`` are the other ranks' fsynced files (all files of the directory, fsynced
    here, when None)."""
    directory = Path(directory)
    if records is None:
        records = sync_and_record(p for p in sorted(directory.iterdir())
                                  if p.is_file() and p.name not in (META, MANIFEST))
    manifest = json.dumps({"files": dict(sorted(records.items()))}, indent=1)
    _write_durably(directory / MANIFEST, manifest)
    meta = {"step": step, "world_size": world_size, "format": FORMAT,
            "manifest_crc32": zlib.crc32(manifest.encode())}
    _write_durably(directory / META, json.dumps(meta))
    fsync_path(directory)


def read_meta(directory: Path) -> dict[str, Any]:
    """The completion marker; raises ValueError when it is unreadable or malformed."""
    try:
        meta = json.loads((Path(directory) / META).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{META} is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) \
            or not isinstance(meta.get("world_size"), int):
        raise ValueError(f"{META} is malformed: {str(meta)[:200]}")
    return meta


def _manifest(directory: Path, meta: dict[str, Any]) -> dict[str, dict[str, int]]:
    path = directory / MANIFEST
    try:
        raw = path.read_bytes()
    except OSError:
        raise ValueError(f"{MANIFEST} is missing") from None
    if zlib.crc32(raw) != meta.get("manifest_crc32"):
        raise ValueError(f"{MANIFEST} does not match the checksum in {META}")
    try:
        files = json.loads(raw)["files"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{MANIFEST} is malformed") from None
    return files


def verify_files(directory: Path, records: dict[str, dict[str, int]],
                 names: Iterable[str]) -> list[str]:
    """Problems with the files ``names`` against their records (empty: all intact)."""
    problems = []
    for name in names:
        path, want = Path(directory) / name, records[name]
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        size = path.stat().st_size
        if size != want["size"]:
            problems.append(f"{name} has {size} bytes, {want['size']} were written")
        elif _crc32(path) != want["crc32"]:
            problems.append(f"{name} does not match its checksum")
    return problems


def verify_checkpoint(directory: Path, rank: int = 0, world_size: int = 1) -> list[str]:
    """Problems found in a complete-looking checkpoint (empty: intact). With several
    ranks, rank r reads every ``world_size``-th file; combine the ranks' lists."""
    directory = Path(directory)
    try:
        meta = read_meta(directory)
        if meta.get("format", 1) < FORMAT:
            return []  # written before manifests: nothing to check against
        records = _manifest(directory, meta)
    except ValueError as e:
        return [str(e)] if rank == 0 else []
    names = sorted(records)
    return verify_files(directory, records, names[rank::world_size])


def set_aside(directory: Path) -> Path:
    """Rename a corrupt checkpoint out of the way (``step_N.corrupt``, ``.corrupt-2`` ...);
    returns the new path. The data stays for inspection; it is never loaded again."""
    directory = Path(directory)
    base = directory.with_name(directory.name.removesuffix(REPLACED) + CORRUPT)
    target, n = base, 1
    while target.exists():
        n += 1
        target = base.with_name(f"{base.name}-{n}")
    os.rename(directory, target)
    fsync_path(directory.parent)
    return target
