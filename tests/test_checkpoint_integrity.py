"""Checkpoints that survive corruption: durability order, manifests, re-saves, fallback.

Synthetic step directories (shard and metadata files named as megatron's torch_dist
writes them) sealed by the same code the trainer uses, then damaged in every way a
disk, a power loss or a killed job damages them. ``tests/test_resume.py`` resumes a real
run past a truncated shard and a malformed marker.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch.distributed as dist

from r1mega.checkpointing import integrity, train_state
from r1mega.checkpointing.integrity import (
    MANIFEST,
    seal_checkpoint,
    set_aside,
    verify_checkpoint,
)
from r1mega.checkpointing.paths import META, complete_steps

FILES = {"__0_0.distcp": 3000, "__1_0.distcp": 5000, ".metadata": 700, "metadata.json": 63,
         "r1mega_config.yaml": 120}


def make_checkpoint(root: Path, step: int, world_size: int = 2) -> Path:
    path = train_state.step_dir(root, step)
    path.mkdir(parents=True)
    for i, (name, size) in enumerate(FILES.items()):
        (path / name).write_bytes(bytes((step * 31 + i * 7 + k) % 251 for k in range(size)))
    seal_checkpoint(path, step, world_size)
    return path


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated shard": (lambda p: os.truncate(p / "__1_0.distcp", 4000),
                        "__1_0.distcp has 4000 bytes, 5000 were written"),
    "empty shard (power loss)": (lambda p: os.truncate(p / "__0_0.distcp", 0),
                                 "__0_0.distcp has 0 bytes"),
    "flipped byte in a shard": (lambda p: _flip_byte(p / "__1_0.distcp", 1234),
                                "__1_0.distcp does not match its checksum"),
    "missing shard": (lambda p: (p / "__0_0.distcp").unlink(), "__0_0.distcp is missing"),
    "altered megatron metadata": (lambda p: _flip_byte(p / ".metadata", 10),
                                  ".metadata does not match its checksum"),
    "truncated metadata.json": (lambda p: os.truncate(p / "metadata.json", 5),
                                "metadata.json has 5 bytes"),
    "empty marker": (lambda p: (p / META).write_text(""), f"{META} is unreadable"),
    "malformed marker": (lambda p: (p / META).write_text('{"step": '),
                         f"{META} is unreadable"),
    "marker without its fields": (lambda p: (p / META).write_text('{"format": 2}'),
                                  f"{META} is malformed"),
    "missing manifest": (lambda p: (p / MANIFEST).unlink(), f"{MANIFEST} is missing"),
    "altered manifest": (lambda p: _flip_byte(p / MANIFEST, 20),
                         f"{MANIFEST} does not match the checksum in {META}"),
}


def test_intact_checkpoint_verifies(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path, 3)
    assert verify_checkpoint(path) == []
    manifest = json.loads((path / MANIFEST).read_text())["files"]
    assert set(manifest) == set(FILES)  # every file but the marker and the manifest
    assert all(manifest[n]["size"] == s for n, s in FILES.items())


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_each_corruption_is_found(tmp_path: Path, kind: str) -> None:
    path = make_checkpoint(tmp_path, 3)
    corrupt, expected = CORRUPTIONS[kind]
    corrupt(path)
    problems = verify_checkpoint(path)
    assert any(expected in p for p in problems), problems
    # Split over ranks (each reads every world_size-th file), nothing is lost.
    split = [p for r in range(3) for p in verify_checkpoint(path, r, 3)]
    assert sorted(split) == sorted(problems)


def test_checkpoints_written_before_manifests_load_unchecked(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path, 1)
    (path / META).write_text(json.dumps({"step": 1, "world_size": 2}))
    (path / MANIFEST).unlink()
    os.truncate(path / "__0_0.distcp", 10)
    assert verify_checkpoint(path) == []


def test_durability_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file is fsynced before the manifest, the manifest before the marker, and the
    directory after the marker (a power loss can then never leave a marker beside
    unwritten data)."""
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(integrity.os, "fsync", recording_fsync)
    path = make_checkpoint(tmp_path, 5)
    names = [Path(p).name for p in synced]
    assert set(FILES) <= set(names)
    last_file = max(names.index(n) for n in FILES)
    assert last_file < names.index(MANIFEST) < names.index(META) < names.index(path.name)


def test_complete_checkpoints_and_set_aside(tmp_path: Path) -> None:
    one, two = make_checkpoint(tmp_path, 1), make_checkpoint(tmp_path, 2)
    (tmp_path / "step_00000003.partial").mkdir()  # killed mid-save: never complete
    (tmp_path / "step_00000004").mkdir()  # no marker: never complete
    assert complete_steps(tmp_path) == [one, two]
    moved = set_aside(two)
    assert moved.name == "step_00000002.corrupt" and not two.exists()
    assert complete_steps(tmp_path) == [one]
    again = make_checkpoint(tmp_path, 2)
    assert set_aside(again).name == "step_00000002.corrupt-2"


def test_resave_never_leaves_a_step_without_a_complete_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = make_checkpoint(tmp_path, 7)
    partial = tmp_path / "new"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"new weights")
    seal_checkpoint(partial, 7, 1)
    # Killed between the two renames: the old copy stands in under its .replaced name.
    real_rename = os.rename
    calls = []

    def rename_then_die(src: object, dst: object) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed mid-publish")
        real_rename(src, dst)

    monkeypatch.setattr(train_state.os, "rename", rename_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_state._publish(partial, old)
    monkeypatch.setattr(train_state.os, "rename", real_rename)
    (survivor,) = complete_steps(tmp_path)
    assert survivor.name == "step_00000007.replaced" and verify_checkpoint(survivor) == []
    assert train_state.find_latest_checkpoint(tmp_path) == survivor
    # The next save of the step completes the replacement and removes the old copy.
    train_state._publish(partial, old)
    assert complete_steps(tmp_path) == [old]
    assert (old / "__0_0.distcp").read_bytes() == b"new weights"
    assert not (tmp_path / "step_00000007.replaced").exists()


@pytest.fixture()
def single_process_group(tmp_path: Path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_corrupt_newest_is_set_aside_and_the_next_older_loaded(
        tmp_path: Path, single_process_group: None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "run"
    intact = make_checkpoint(root, 1)
    truncated, bad_marker = make_checkpoint(root, 2), make_checkpoint(root, 3)
    os.truncate(truncated / "__0_0.distcp", 100)
    (bad_marker / META).write_text("{")
    loaded: list[Path] = []

    def fake_load(path: Path, *args: object) -> dict[str, object]:
        loaded.append(Path(path))
        return {"step": 1}

    monkeypatch.setattr(train_state, "load_checkpoint", fake_load)
    path, state = train_state.load_latest_checkpoint(root, None, None, None)
    assert path == intact and loaded == [intact] and state == {"step": 1}
    out = capsys.readouterr().out
    assert f"checkpoint {bad_marker} is corrupt ({META} is unreadable" in out
    assert f"checkpoint {truncated} is corrupt (__0_0.distcp has 100 bytes" in out
    assert sorted(p.name for p in root.iterdir()) == [
        "step_00000001", "step_00000002.corrupt", "step_00000003.corrupt"]
    # Nothing intact left: a fresh start, not a crash.
    os.truncate(intact / "__1_0.distcp", 0)
    assert train_state.load_latest_checkpoint(root, None, None, None) is None
