"""Hugging Face model directories as weights: converted once, reused while unchanged.

A job given an HF directory (``checkpoint.load``, ``r1mega eval|generate PATH``, the
reward model of ``rewards.reward_model.load``) loads it through a megatron distributed
checkpoint that the streaming converter (:mod:`r1mega.convert`) writes into a cache entry
``<root>/<model name>-<fingerprint>/``; later jobs (and every rank of this one) reuse it.

The root is ``checkpoint.hf_cache_dir`` when set, else ``<checkpoint.save_dir>/hf_cache``
(next to the run, on the file system its ranks share), else ``$R1MEGA_CACHE_DIR`` or
``~/.cache/r1mega/hf``. Point several runs at one ``checkpoint.hf_cache_dir`` to
convert a large model only once.

**Unchanged** means the same fingerprint: the name, size and modification time (ns) of
``config.json``, ``model.safetensors.index.json`` and every ``*.safetensors`` file, plus
the conversion options (dtype, MTP kept or left out) and the entry format. A re-download
or an edited weight file changes a size or a time, so it gets a new entry (the entry of
the old files is removed once the new one is complete); hashing the contents would cost
as much as converting them (1.3 TB for DeepSeek-V3). Tokenizer files are read from the
source directory itself, so they are not part of the fingerprint.

An entry is complete when its ``r1mega_source.json`` exists (written after the
conversion's atomic rename). Ranks and jobs that need the same entry take an exclusive
``flock`` on ``<root>/.<entry>.lock``: the first one converts, the others wait and find it
complete. Inside a running multi-process job the conversion runs in a subprocess (it
builds world-size-1 process groups of its own).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r1mega.checkpointing.paths import HF_CONFIG, SourceKind, WeightSource

SOURCE_RECORD = "r1mega_source.json"
CACHE_ENV = "R1MEGA_CACHE_DIR"
_FORMAT = 1  # bump when the layout of a converted entry changes


@dataclass(frozen=True)
class ConversionOptions:
    """How an HF directory is converted for a job."""

    dtype: str
    include_mtp: bool = True


def cache_root(cfg: Any) -> Path:
    """Where this job's converted HF models live (see the module docstring)."""
    checkpoint = cfg.checkpoint
    if checkpoint.hf_cache_dir:
        return Path(checkpoint.hf_cache_dir)
    if checkpoint.save_dir:
        return Path(checkpoint.save_dir) / "hf_cache"
    return default_cache_root()


def default_cache_root() -> Path:
    """The cache of a job that has no run directory: ``$R1MEGA_CACHE_DIR`` or
    ``~/.cache/r1mega/hf``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path.home() / ".cache" / "r1mega" / "hf"


def _weight_files(source: Path) -> list[Path]:
    files = [source / HF_CONFIG, *sorted(source.glob("*.safetensors"))]
    index = source / "model.safetensors.index.json"
    return files + ([index] if index.is_file() else [])


def fingerprint(source: Path, options: ConversionOptions) -> dict[str, Any]:
    """What decides whether a cached conversion of ``source`` is still valid."""
    files = {}
    for path in _weight_files(source):
        stat = path.stat()
        files[path.name] = [stat.st_size, stat.st_mtime_ns]
    return {"format": _FORMAT, "dtype": options.dtype, "include_mtp": options.include_mtp,
            "files": files}


def entry_name(source: Path, print_: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(print_, sort_keys=True).encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", source.resolve().name) or "model"
    return f"{name}-{digest}"


def is_complete(entry: Path) -> bool:
    return (entry / SOURCE_RECORD).is_file()


@contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _in_multi_process_job() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _convert(source: Path, entry: Path, options: ConversionOptions) -> None:
    """Convert ``source`` into ``entry``: in this process when it is free to build its own
    process groups, else in a subprocess (the same ``r1mega convert`` a user runs)."""
    if not _in_multi_process_job():
        from r1mega.convert.hf_to_megatron import convert_hf_to_megatron

        convert_hf_to_megatron(source, entry, dtype=options.dtype,
                               include_mtp=options.include_mtp)
        return
    command = [sys.executable, "-m", "r1mega.cli", "convert", "hf-to-megatron", str(source),
               str(entry), "--dtype", options.dtype]
    if not options.include_mtp:
        command.append("--no-mtp")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS")}
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        from r1mega.convert.errors import ConversionError

        reason = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ConversionError(f"converting {source} into {entry} failed: {reason}")


def _remove_stale(root: Path, keep: Path, source: Path, files: dict[str, Any]) -> None:
    """Entries of the same source directory made from files that have since changed
    (entries of the current files with other options stay)."""
    for other in root.iterdir():
        if other == keep or not is_complete(other):
            continue
        try:
            record = json.loads((other / SOURCE_RECORD).read_text())
        except (OSError, ValueError):
            continue
        if (record.get("source") == str(source.resolve())
                and record.get("fingerprint", {}).get("files") != files):
            shutil.rmtree(other, ignore_errors=True)


def converted_checkpoint(source: WeightSource, root: Path, options: ConversionOptions,
                         log: Any = print) -> Path:
    """The cache entry holding ``source`` (an HF directory) as a megatron checkpoint,
    converted now if no entry matches its current files. Safe to call from every rank
    and from concurrent jobs."""
    if source.kind is not SourceKind.HF:
        raise ValueError(f"{source.spec} is not a Hugging Face model directory")
    print_ = fingerprint(source.path, options)
    entry = root / entry_name(source.path, print_)
    if is_complete(entry):
        return entry
    with _exclusive(root / f".{entry.name}.lock"):
        if is_complete(entry):  # another rank or job converted it meanwhile
            return entry
        shutil.rmtree(entry, ignore_errors=True)  # an interrupted conversion
        log(f"[r1mega] converting {source.path} into {entry} (once; reused while its "
            "files are unchanged)")
        _convert(source.path, entry, options)
        record = {"source": str(source.path.resolve()), "fingerprint": print_}
        tmp = entry / (SOURCE_RECORD + ".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, entry / SOURCE_RECORD)
        _remove_stale(root, entry, source.path, print_["files"])
    return entry


def converted_hf_model(cfg: Any, source: WeightSource, log: Any = print) -> Path:
    """The megatron checkpoint of the HF directory ``source`` for ``cfg``'s job (its
    ``precision.params_dtype``; MTP as ``model.mtp_num_layers`` says), converted into the
    job's cache on first use. Every rank may call it."""
    options = ConversionOptions(dtype=cfg.precision.params_dtype,
                                include_mtp=cfg.model.mtp_num_layers > 0)
    return converted_checkpoint(source, cache_root(cfg), options, log=log)


def converted_reward_model(source: WeightSource, root: Path, params_dtype: str,
                           log: Any = print) -> Path:
    """The megatron checkpoint of the HF reward model ``source`` (a one-label
    ``*ForSequenceClassification`` directory) in ``params_dtype``, converted into ``root``
    on first use. Every rank may call it."""
    return converted_checkpoint(source, root, ConversionOptions(dtype=params_dtype,
                                                                include_mtp=False), log=log)


def prepare_weights(cfg: Any, reward_model: bool = False) -> None:
    """Before a job's processes start: convert ``checkpoint.load`` and, for a job that
    scores with it (``reward_model``), the reward model of ``rewards.reward_model.load``
    where they are HF directories without a current conversion, so that the ranks find
    them in the cache. The reward model is checked first (ConfigError naming the key), so
    a wrong path fails before a long conversion."""
    from r1mega.checkpointing.paths import resolve_weight_source
    from r1mega.config.from_weights import reward_model_weights

    scorer = reward_model_weights(cfg) if reward_model else None
    if cfg.checkpoint.load:
        source = resolve_weight_source(cfg.checkpoint.load)
        if source.kind is SourceKind.HF:
            converted_hf_model(cfg, source)
    if scorer is not None and scorer.kind is SourceKind.HF:
        converted_reward_model(scorer, cache_root(cfg), cfg.precision.params_dtype)
