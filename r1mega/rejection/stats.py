"""``stats.json``: what a rejection-sampling run generated, kept and dropped, and why.

Computed from the progress log (every done prompt's per-sample outcomes): rebuilt from the
whole log on every start and then updated with each committed prompt, never carried
over from a previous process, so a resumed run reports exactly what an uninterrupted one
would, and the numbers add up by construction:

* ``samples_generated == kept + dropped_total`` and ``dropped_total`` is the sum of
  ``dropped`` (one entry per reason of :data:`~r1mega.rejection.filtering.DROP_REASONS`,
  zeros included, so a reader sees which filters exist);
* ``kept`` equals the number of rows in ``dataset.jsonl`` and the sum over the
  ``kept_per_prompt`` histogram of (kept count x prompts);
* the histogram's prompt counts sum to ``prompts_done``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from r1mega.rejection.filtering import DROP_REASONS
from r1mega.rejection.store import PromptOutcome


class Lengths:
    """Count, total, min and max of a stream of lengths (constant memory)."""

    def __init__(self) -> None:
        self.count = self.total = 0
        self.min: int | None = None
        self.max: int | None = None

    def add(self, values: Iterable[int]) -> None:
        for v in values:
            self.count += 1
            self.total += v
            self.min = v if self.min is None else min(self.min, v)
            self.max = v if self.max is None else max(self.max, v)

    def as_dict(self) -> dict[str, float]:
        return {"count": self.count, "total": self.total, "min": self.min or 0,
                "max": self.max or 0, "mean": self.total / self.count if self.count else 0.0}


def _rate(kept: int, generated: int) -> float:
    return kept / generated if generated else 0.0


class SampleStats:
    """The statistics of the prompts added so far, updated one prompt at a time (a run
    of millions of prompts rewrites ``stats.json`` after every batch)."""

    def __init__(self, prompts_total: int) -> None:
        self.prompts_total = prompts_total
        self.prompts_done = self.generated = self.kept = 0
        self.dropped: Counter[str] = Counter(dict.fromkeys(DROP_REASONS, 0))
        self.histogram: Counter[int] = Counter()
        self.lengths = {(unit, which): Lengths() for unit in ("tokens", "chars")
                        for which in ("generated", "kept")}
        self.sources: dict[str, dict[str, Any]] = {}

    def add(self, record: PromptOutcome) -> None:
        kept = record.kept
        self.prompts_done += 1
        self.generated += len(record.outcomes)
        self.kept += kept
        self.dropped.update(record.dropped)
        self.histogram[kept] += 1
        for unit, values in (("tokens", record.tokens), ("chars", record.chars)):
            self.lengths[unit, "generated"].add(values)
            self.lengths[unit, "kept"].add(
                v for v, o in zip(values, record.outcomes, strict=True) if o is None)
        source = self.sources.setdefault(record.source, {
            "kind": record.kind, "prompts": 0, "generated": 0, "kept": 0, "dropped": Counter()})
        source["prompts"] += 1
        source["generated"] += len(record.outcomes)
        source["kept"] += kept
        source["dropped"].update(record.dropped)

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompts_total": self.prompts_total,
            "prompts_done": self.prompts_done,
            "complete": self.prompts_done == self.prompts_total,
            "samples_generated": self.generated,
            "kept": self.kept,
            "dropped_total": sum(self.dropped.values()),
            "dropped": dict(self.dropped),
            "acceptance_rate": _rate(self.kept, self.generated),
            "kept_per_prompt": {
                "histogram": {str(k): self.histogram[k] for k in sorted(self.histogram)},
                "mean": self.kept / self.prompts_done if self.prompts_done else 0.0,
                "prompts_with_none": self.histogram[0],
            },
            "response_tokens": {w: self.lengths["tokens", w].as_dict()
                                for w in ("generated", "kept")},
            "response_chars": {w: self.lengths["chars", w].as_dict()
                               for w in ("generated", "kept")},
            "by_source": {name: {**source, "dropped": dict(sorted(source["dropped"].items())),
                                 "acceptance_rate": _rate(source["kept"], source["generated"])}
                          for name, source in sorted(self.sources.items())},
        }


def compute_stats(done: Iterable[PromptOutcome], prompts_total: int) -> dict[str, Any]:
    """The statistics of the prompts ``done`` (see the module docstring)."""
    stats = SampleStats(prompts_total)
    for record in sorted(done, key=lambda r: r.prompt_index):
        stats.add(record)
    return stats.as_dict()


def progress_line(stats: dict[str, Any], batch: int, batches: int, seconds: float) -> str:
    """One console line per batch on rank 0."""
    reasons = ", ".join(f"{k} {v}" for k, v in stats["dropped"].items() if v) or "none"
    return (f"[r1mega sample] batch {batch}/{batches} | prompts {stats['prompts_done']}/"
            f"{stats['prompts_total']} | generated {stats['samples_generated']} | kept "
            f"{stats['kept']} ({100 * stats['acceptance_rate']:.1f}%) | dropped {reasons} | "
            f"{seconds:.1f}s")
