"""Output directories that appear only when complete, and files that travel along.

A conversion writes into a hidden temporary directory next to the target (same
filesystem, so the final ``rename`` is atomic) and renames it into place only after
everything succeeded; on any failure the temporary directory is removed, so a failed
conversion leaves nothing behind and never a half-written checkpoint under the target
name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from r1mega.convert.errors import ConversionError

# Tokenizer and generation files copied between HF and megatron checkpoint directories.
ASSET_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
    "generation_config.json",
)


def check_target(target: str | Path) -> Path:
    """``target`` as a Path; it must not exist yet, or be an empty directory."""
    path = Path(target)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConversionError(f"output {path} already exists and is not an empty directory")
    return path


@contextlib.contextmanager
def atomic_output_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``target`` when the block succeeds."""
    path = check_target(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        check_target(path)
        if path.exists():
            path.rmdir()
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_assets(source: str | Path, target: str | Path) -> list[str]:
    """Copy the tokenizer/generation files present in ``source``; returns their names."""
    copied = []
    for name in ASSET_FILES:
        src = Path(source) / name
        if src.is_file():
            shutil.copy2(src, Path(target) / name)
            copied.append(name)
    return copied
