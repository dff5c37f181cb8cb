"""Prompt datasets (JSONL / Parquet) and a deterministic, resumable DP sampler.

GRPO only needs prompts (plus a reference answer or test cases for the reward), so a
dataset here is a list of :class:`PromptExample` held in memory; even a million prompts
is small next to the model. Real-world prompt files are messy, and one bad row must not
kill a multi-day run, so malformed rows are *skipped, logged with file and line, and
counted* instead of raising; only a file with no usable row at all is an error.

The sampler is the piece that must be exactly reproducible: every DP rank computes the
same global order from ``(seed, epoch)`` alone, takes its own disjoint slice of each
global batch, and its ``state_dict`` (epoch, position) lets a resumed run continue with
precisely the batch the interrupted run would have drawn next.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES

# Skip reasons (the keys of ``PromptDataset.skip_counts``).
INVALID_JSON = "invalid_json"
INVALID_ENCODING = "invalid_encoding"
NOT_OBJECT = "not_object"
MISSING_PROMPT = "missing_prompt"
EMPTY_PROMPT = "empty_prompt"
NON_STRING_PROMPT = "non_string_prompt"
MISSING_ANSWER = "missing_answer"
NON_STRING_ANSWER = "non_string_answer"

_MISSING = object()


class EmptyDatasetError(ValueError):
    """A prompt file yielded no usable row: training on it would silently do nothing."""


@dataclass
class PromptExample:
    """One prompt as read from disk, before any template is applied.

    ``prompt`` is the raw question so templates can be chosen later (and changed without
    re-reading data); ``metadata`` keeps every other field of the row (e.g. unit tests for
    code rewards); ``source`` (``file:line``, or ``file:row N`` for Parquet) lets a sample
    seen in a log be traced back to the data.
    """

    index: int
    prompt: str
    answer: str | None
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = ""


@dataclass(frozen=True)
class SkippedRow:
    """Why one row was not used; kept so data problems can be audited after loading."""

    path: str
    line: int  # 1-based line for JSONL, 0-based row index for Parquet / JSON arrays
    reason: str


def get_field(row: dict[str, Any], name: str) -> Any:
    """``row[name]``, or the nested value for a dotted ``name`` (``meta.question``).

    An exact top-level key wins over the dotted interpretation, so columns whose names
    contain dots (common in flattened Parquet exports) still work. Returns ``_MISSING``
    when absent, which keeps "absent" distinguishable from an explicit ``null``.
    """
    if name in row:
        return row[name]
    node: Any = row
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _drop_field(row: dict[str, Any], name: str) -> None:
    """Remove ``name`` (possibly dotted) from ``row`` in place, if present."""
    if name in row:
        del row[name]
        return
    parts = name.split(".")
    node: Any = row
    for part in parts[:-1]:
        if not isinstance(node, dict) or part not in node:
            return
        node = node[part]
    if isinstance(node, dict):
        node.pop(parts[-1], None)


class PromptDataset:
    """All valid prompts of one JSONL or Parquet file, in file order.

    Args:
        path: ``.jsonl`` / ``.json`` (JSON lines; a ``.json`` file holding one JSON array
            is also accepted) or ``.parquet``.
        prompt_field: field holding the question; dots address nested fields.
        answer_field: field holding the reference answer; ``None`` = no answers.
        require_answer: skip rows without an answer. Math accuracy rewards need one; code
            tasks carry tests in ``metadata`` instead and set this to ``False``.
        max_warnings: per-row warnings logged before only the summary is (a corrupt
            million-row file must not flood the log; ``skipped`` still lists every row).
        max_examples: stop reading after this many valid rows (checks before launch
            read a file's first rows only; a file with no valid row is still read whole).

    Attributes:
        examples: the valid rows as :class:`PromptExample`, ``index`` = position here.
        skipped: every skipped row as :class:`SkippedRow` (path, line, reason).
        skip_counts: ``Counter`` of skip reasons.
    """

    def __init__(self, path: str | Path, prompt_field: str = "problem",
                 answer_field: str | None = "answer", require_answer: bool = True,
                 max_warnings: int = 20, max_examples: int | None = None) -> None:
        self.path = Path(path)
        self.prompt_field = prompt_field
        self.answer_field = answer_field or None
        self.require_answer = require_answer and self.answer_field is not None
        self.max_warnings = max_warnings
        self.max_examples = max_examples
        self.examples: list[PromptExample] = []
        self.skipped: list[SkippedRow] = []
        self.skip_counts: Counter[str] = Counter()
        self._row_indexed = self.path.suffix.lower() in PARQUET_SUFFIXES

        if not prompt_field:
            raise ValueError("prompt_field must be a non-empty field name")
        suffix = self.path.suffix.lower()
        if suffix not in SUPPORTED_SUFFIXES:
            raise ValueError(
                f"unsupported prompt file extension {self.path.suffix!r} for {self.path}: "
                f"expected one of {', '.join(SUPPORTED_SUFFIXES)}"
            )
        if not self.path.is_file():
            raise FileNotFoundError(f"prompt file not found: {self.path}")

        if suffix in PARQUET_SUFFIXES:
            self._load_parquet()
        else:
            self._load_json()

        if self.skipped and self.max_warnings:
            logger.warning(
                "%s: skipped %d of %d rows (%s)", self.path, len(self.skipped),
                len(self.skipped) + len(self.examples),
                ", ".join(f"{k}={v}" for k, v in sorted(self.skip_counts.items())),
            )
        if not self.examples:
            detail = (
                "; skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(self.skip_counts.items()))
                if self.skipped else " (the file has no rows)"
            )
            first = (f" (first: line {self.skipped[0].line}, {self.skipped[0].reason})"
                     if self.skipped and not self._row_indexed else "")
            raise EmptyDatasetError(
                f"prompt file {self.path} has no valid rows with prompt field "
                f"{self.prompt_field!r}"
                + (f" and answer field {self.answer_field!r}" if self.require_answer else "")
                + detail + first
            )

    # ------------------------------------------------------------------ loading

    def _skip(self, line: int, reason: str, detail: str = "") -> None:
        self.skipped.append(SkippedRow(str(self.path), line, reason))
        self.skip_counts[reason] += 1
        if len(self.skipped) <= self.max_warnings:
            where = f"row {line}" if self._row_indexed else f"line {line}"
            logger.warning("%s: %s: skipped (%s)%s", self.path, where, reason,
                           f": {detail}" if detail else "")

    def _load_json(self) -> None:
        raw = self.path.read_bytes()
        self._row_indexed = False
        if self.path.suffix.lower() == ".json" and raw.lstrip()[:1] == b"[":
            try:
                items = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                items = None  # not one array after all: fall back to JSON lines
            if isinstance(items, list):
                self._row_indexed = True
                for i, item in enumerate(items):
                    if self._enough():
                        return
                    self._add_row(item, i, f"{self.path}:item {i}")
                return
        for lineno, line in enumerate(raw.splitlines(), start=1):
            if self._enough():
                return
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) are not rows
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                self._skip(lineno, INVALID_ENCODING, str(e))
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                self._skip(lineno, INVALID_JSON, e.msg)
                continue
            self._add_row(row, lineno, f"{self.path}:{lineno}")

    def _load_parquet(self) -> None:
        import pyarrow.parquet as pq

        self._row_indexed = True
        row_index = 0
        try:
            parquet = pq.ParquetFile(self.path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types
            raise ValueError(f"prompt file {self.path} is not a readable Parquet file: "
                             f"{type(e).__name__}: {e}") from None
        columns = parquet.schema_arrow.names
        needed = [("prompt", self.prompt_field)]
        if self.require_answer and self.answer_field is not None:
            needed.append(("answer", self.answer_field))
        for what, name in needed:
            if name not in columns and name.split(".")[0] not in columns:
                raise EmptyDatasetError(
                    f"prompt file {self.path} has no column {name!r} for the {what} "
                    f"(columns: {', '.join(columns) or 'none'})")
        for batch in parquet.iter_batches():
            for row in batch.to_pylist():
                if self._enough():
                    return
                self._add_row(row, row_index, f"{self.path}:row {row_index}")
                row_index += 1

    def _enough(self) -> bool:
        return self.max_examples is not None and len(self.examples) >= self.max_examples

    def _add_row(self, row: Any, line: int, source: str) -> None:
        """Validate one decoded row and append it as an example, or record the skip."""
        if not isinstance(row, dict):
            self._skip(line, NOT_OBJECT, f"got {type(row).__name__}")
            return
        prompt = get_field(row, self.prompt_field)
        if prompt is _MISSING or prompt is None:
            self._skip(line, MISSING_PROMPT, f"{self.prompt_field!r} is "
                       + ("absent" if prompt is _MISSING else "null"))
            return
        if not isinstance(prompt, str):
            self._skip(line, NON_STRING_PROMPT,
                       f"{self.prompt_field!r} is {type(prompt).__name__}")
            return
        if not prompt.strip():
            self._skip(line, EMPTY_PROMPT, f"{self.prompt_field!r} is empty")
            return

        answer: str | None = None
        if self.answer_field is not None:
            value = get_field(row, self.answer_field)
            if value is _MISSING or value is None:
                if self.require_answer:
                    self._skip(line, MISSING_ANSWER, f"{self.answer_field!r} is "
                               + ("absent" if value is _MISSING else "null"))
                    return
            elif isinstance(value, str):
                answer = value
            elif isinstance(value, int | float) and not isinstance(value, bool):
                answer = str(value)  # numeric answers (GSM8K-style) are compared as text
            elif self.require_answer:
                self._skip(line, NON_STRING_ANSWER,
                           f"{self.answer_field!r} is {type(value).__name__}")
                return

        metadata = copy.deepcopy(row)
        _drop_field(metadata, self.prompt_field)
        if self.answer_field is not None and answer is not None:
            _drop_field(metadata, self.answer_field)
        self.examples.append(PromptExample(len(self.examples), prompt, answer, metadata, source))

    # ------------------------------------------------------------------ access

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> PromptExample:
        return self.examples[i]

    def __iter__(self) -> Iterator[PromptExample]:
        return iter(self.examples)

    def __repr__(self) -> str:
        return (f"PromptDataset({str(self.path)!r}, {len(self)} examples, "
                f"{len(self.skipped)} skipped)")


def load_prompt_dataset(data_cfg: Any, split: str = "train",
                        require_answer: bool = True) -> PromptDataset:
    """The ``train`` or ``eval`` dataset described by a :class:`DataConfig`."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    path = getattr(data_cfg, f"{split}_path")
    if not path:
        raise ValueError(f"data.{split}_path is not set")
    return PromptDataset(path, prompt_field=data_cfg.prompt_field,
                         answer_field=data_cfg.answer_field, require_answer=require_answer)


# ---------------------------------------------------------------------- sampler


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The order of ``range(n)`` for one epoch, a pure function of ``(seed, epoch)``.

    The seed is hashed (not ``seed + epoch``) so neighbouring seeds/epochs do not give
    correlated orders, and no global RNG state is touched, so other code drawing random
    numbers cannot perturb the data order.
    """
    order = list(range(n))
    if shuffle:
        digest = hashlib.sha256(f"r1mega.data:{seed}:{epoch}".encode()).digest()
        random.Random(int.from_bytes(digest[:8], "little")).shuffle(order)
    return order


class PromptSampler:
    """Infinite stream of per-rank prompt batches, deterministic and resumable.

    Each step draws one *global* batch of ``batch_size`` prompts from the epoch's
    permutation; DP rank ``r`` gets the contiguous slice ``[r*k, (r+1)*k)`` with
    ``k = batch_size // dp_size``, so ranks are disjoint and together cover the global
    batch. A batch that runs past the end of an epoch continues into the next epoch's
    (freshly shuffled) order rather than dropping the tail, so every prompt is used once
    per epoch and datasets smaller than a batch still work.

    The state is global (it does not depend on ``dp_rank``/``dp_size``), so every rank
    saves the same ``state_dict`` and a run may even resume with a different DP size.
    """

    def __init__(self, dataset: PromptDataset | list[PromptExample], batch_size: int,
                 seed: int, shuffle: bool = True, dp_rank: int = 0, dp_size: int = 1) -> None:
        if len(dataset) == 0:
            raise ValueError("PromptSampler needs a non-empty dataset")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, "
                             f"dp_size={dp_size}")
        if batch_size % dp_size:
            raise ValueError(f"global batch_size={batch_size} is not divisible by "
                             f"dp_size={dp_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.epoch = 0
        self.position = 0  # prompts of the current epoch already drawn
        self._order_epoch = -1
        self._order: list[int] = []

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.dp_size

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch != self._order_epoch:
            self._order = epoch_permutation(len(self.dataset), self.seed, epoch, self.shuffle)
            self._order_epoch = epoch
        return self._order

    def next_global_indices(self) -> list[int]:
        """Dataset indices of the next global batch (all ranks), advancing the state."""
        n = len(self.dataset)
        indices: list[int] = []
        while len(indices) < self.batch_size:
            order = self._epoch_order(self.epoch)
            take = min(self.batch_size - len(indices), n - self.position)
            indices.extend(order[self.position:self.position + take])
            self.position += take
            if self.position == n:
                self.epoch += 1
                self.position = 0
        return indices

    def next_batch(self) -> list[PromptExample]:
        """This rank's slice of the next global batch."""
        indices = self.next_global_indices()
        k = self.local_batch_size
        return [self.dataset[i] for i in indices[self.dp_rank * k:(self.dp_rank + 1) * k]]

    def __iter__(self) -> Iterator[list[PromptExample]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands; the fingerprint fields guard against resuming on a
        different dataset/seed, which would silently change the order."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "dataset_size": len(self.dataset),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly after the last batch drawn by the sampler that saved ``state``."""
        mismatched = [
            f"{key}: saved {state[key]!r}, now {value!r}"
            for key, value in (("seed", self.seed), ("shuffle", self.shuffle),
                               ("dataset_size", len(self.dataset)))
            if key in state and state[key] != value
        ]
        if mismatched:
            raise ValueError("sampler state does not match this dataset/sampler ("
                             + "; ".join(mismatched) + "): resuming would change the order")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < len(self.dataset):
            raise ValueError(f"invalid sampler state epoch={epoch}, position={position} for "
                             f"a dataset of {len(self.dataset)} prompts")
        self.epoch, self.position = epoch, position
