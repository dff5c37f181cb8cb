"""The output directory of a rejection-sampling run: crash-safe appends and resuming.

Files (only global rank 0 writes them)::

    run.json         the run's manifest, written once before any data: what determines
                     the rows (prompts, sampling, filters, weights). A re-run with other
                     settings is refused instead of silently mixing two datasets.
    dataset.jsonl    the SFT rows: {"prompt", "response", "reward", "source",
                     "prompt_index", "response_tokens"}
    progress.jsonl   the commit log: one line per finished prompt with the outcome of
                     each of its samples (kept, or why dropped) and their lengths
    stats.json       derived from progress.jsonl (:mod:`r1mega.rejection.stats`)

A batch is committed in two appends, each flushed and fsynced: first its rows to
``dataset.jsonl``, then its prompts' lines to ``progress.jsonl``. ``progress.jsonl`` is
the truth: a prompt is done iff its line is complete. On every start :meth:`SampleStore.
open` repairs what a crash can leave behind: a torn last line of either file is cut off,
and rows of prompts that are not done (a batch killed after its rows were written but
before its commit) are removed. Each done prompt's row count must then equal the kept
count its progress line records, so a dataset can never hold a row twice or miss one
without the run refusing to continue.

Prompts with no kept sample have no row but still a progress line, which is why the
progress cannot be rebuilt from the dataset alone.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DATASET = "dataset.jsonl"
PROGRESS = "progress.jsonl"
STATS = "stats.json"
MANIFEST = "run.json"


class StoreError(RuntimeError):
    """The output directory cannot be resumed safely (it names the file and the problem)."""


@dataclass
class PromptOutcome:
    """One finished prompt: the outcome of every sample, in seed order."""

    prompt_index: int
    source: str  # prompt source name (data.sources[i].name, or "prompts")
    kind: str  # rules | reward_model
    outcomes: list[str | None]  # None = kept, else the drop reason
    tokens: list[int]  # response length of each sample, in tokens
    chars: list[int]  # ... and in characters of the decoded text

    @property
    def kept(self) -> int:
        return sum(o is None for o in self.outcomes)

    @property
    def dropped(self) -> Counter[str]:
        return Counter(o for o in self.outcomes if o is not None)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _append(path: Path, lines: Iterable[str]) -> None:
    """Append whole lines in one write, durable before returning."""
    data = "".join(line + "\n" for line in lines).encode()
    if not data:
        return
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` so a reader sees the old or the new file, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _parse(line: bytes, path: Path, number: int) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreError(f"{path}:{number}: not a JSON line ({err}); the file was changed "
                         "outside r1mega sample") from None
    if not isinstance(value, dict) or not isinstance(value.get("prompt_index"), int):
        raise StoreError(f"{path}:{number}: not a record of r1mega sample")
    return value


def _parse_outcome(line: bytes, path: Path, number: int) -> PromptOutcome:
    try:
        return PromptOutcome(**_parse(line, path, number))
    except TypeError as err:
        raise StoreError(f"{path}:{number}: not a progress record ({err})") from None


class SampleStore:
    """Rank 0's handle on the output directory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.dataset_path = self.directory / DATASET
        self.progress_path = self.directory / PROGRESS
        self.stats_path = self.directory / STATS
        self.manifest_path = self.directory / MANIFEST

    # ------------------------------------------------------------------ start

    def open(self, manifest: dict[str, Any]) -> dict[int, int]:
        """Check the manifest, repair the files after a crash; returns the done prompts
        (index -> number of kept samples)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._check_manifest(manifest)
        done = self._read_progress()
        self._repair_dataset(done)
        # The dataset exists from the start, empty until a row is kept: the next stage
        # reading it then reports "no rows" instead of a missing file.
        self.dataset_path.touch()
        return done

    def _check_manifest(self, manifest: dict[str, Any]) -> None:
        manifest = json.loads(json.dumps(manifest))  # the form it has on disk
        if not self.manifest_path.exists():
            if self.progress_path.exists() or self.dataset_path.exists():
                raise StoreError(f"{self.directory} holds {DATASET}/{PROGRESS} but no "
                                 f"{MANIFEST}: not a directory written by r1mega sample; "
                                 "choose another sample.output_dir")
            write_atomic(self.manifest_path, json.dumps(manifest, indent=2, sort_keys=True))
            return
        saved = json.loads(self.manifest_path.read_text())
        changed = sorted(k for k in set(saved) | set(manifest) if saved.get(k) != manifest.get(k))
        if changed:
            detail = "; ".join(f"{k}: was {saved.get(k)!r}, now {manifest.get(k)!r}"
                               for k in changed)
            raise StoreError(f"{self.directory} was written with other settings ({detail}); "
                             "resuming would mix two datasets: use a new sample.output_dir "
                             "or the original settings")

    def _read_progress(self) -> dict[int, int]:
        done: dict[int, int] = {}
        if not self.progress_path.exists():
            return done
        end = 0
        with open(self.progress_path, "rb") as f:
            for number, line in enumerate(f, start=1):
                if not line.endswith(b"\n"):
                    break  # a torn commit: that prompt is not done
                record = _parse_outcome(line, self.progress_path, number)
                if record.prompt_index in done:
                    raise StoreError(f"{self.progress_path}:{number}: prompt "
                                     f"{record.prompt_index} recorded twice")
                done[record.prompt_index] = record.kept
                end = f.tell()
        if self.progress_path.stat().st_size != end:
            os.truncate(self.progress_path, end)
        return done

    def progress(self) -> Iterator[PromptOutcome]:
        """The done prompts' records, in commit order (after :meth:`open`)."""
        if not self.progress_path.exists():
            return
        with open(self.progress_path, "rb") as f:
            for number, line in enumerate(f, start=1):
                yield _parse_outcome(line, self.progress_path, number)

    def _repair_dataset(self, done: dict[int, int]) -> None:
        """Cut the dataset back to the rows of done prompts and check their counts; reads
        the file as a stream (a dataset can be far larger than memory should hold)."""
        rows = Counter[int]()
        prefix_end = 0  # bytes of the leading run of rows that stay
        rewrite = False  # a row that stays follows one that goes
        if self.dataset_path.exists():
            with open(self.dataset_path, "rb") as f:
                for number, line in enumerate(f, start=1):
                    if not line.endswith(b"\n"):
                        break  # a torn last line
                    index = _parse(line, self.dataset_path, number)["prompt_index"]
                    if index in done:
                        rows[index] += 1
                        if prefix_end == f.tell() - len(line):
                            prefix_end = f.tell()
                        else:
                            rewrite = True
        wrong = [(i, rows[i], kept) for i, kept in done.items() if rows[i] != kept]
        if wrong:
            i, have, want = min(wrong)
            raise StoreError(f"{self.dataset_path} has {have} row(s) of prompt {i} but "
                             f"{self.progress_path.name} records {want} kept "
                             f"({len(wrong)} prompt(s) disagree): the dataset was changed "
                             "outside r1mega sample")
        if rewrite:
            self._rewrite_dataset(set(done))
        elif self.dataset_path.exists() and self.dataset_path.stat().st_size != prefix_end:
            os.truncate(self.dataset_path, prefix_end)  # the usual case: an uncommitted tail

    def _rewrite_dataset(self, done: set[int]) -> None:
        """Keep only complete rows of ``done`` prompts, replacing the file atomically."""
        tmp = self.dataset_path.with_name(self.dataset_path.name + ".tmp")
        with open(self.dataset_path, "rb") as src, open(tmp, "wb") as dst:
            for line in src:
                if line.endswith(b"\n") and json.loads(line)["prompt_index"] in done:
                    dst.write(line)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, self.dataset_path)
        _fsync_dir(self.directory)

    # ------------------------------------------------------------------ commit

    def append_rows(self, rows: list[dict[str, Any]]) -> None:
        """Step 1 of a batch's commit: its rows, durable before the progress lines."""
        _append(self.dataset_path, (json.dumps(row) for row in rows))

    def record_progress(self, outcomes: list[PromptOutcome]) -> None:
        """Step 2: the batch's prompts are done once these lines are on disk."""
        _append(self.progress_path, (json.dumps(asdict(o)) for o in outcomes))

    def write_stats(self, stats: dict[str, Any]) -> None:
        write_atomic(self.stats_path, json.dumps(stats, indent=2) + "\n")

    def read_rows(self) -> list[dict[str, Any]]:
        """Every row of the dataset (for tests and tools)."""
        with open(self.dataset_path, "rb") as f:
            return [json.loads(line) for line in f if line.endswith(b"\n")]
