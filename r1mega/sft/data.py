"""SFT rows: from a JSONL/Parquet file (or the built-in cold-start set) to token ids.

A row is a prompt and a response (``sft.prompt_field`` / ``sft.response_field``). The
prompt goes through ``data.template`` exactly as RL rollouts do (same template, no BOS,
prompt and response encoded separately, as a rollout's prompt ids and sampled ids are),
so a fine-tuned model continues in RL from the context it was trained in. The response
is followed by the tokenizer's EOS: the model must learn to stop, and RL rollouts stop
at EOS. Only response and EOS tokens are trained on (:func:`SFTExample.loss_mask`).

Rows are dropped, and counted by reason, when

* they are malformed (no prompt, no response, invalid JSON ...): reported with file and
  line by :class:`~r1mega.data.prompts.PromptDataset`;
* ``sft.filter_readability`` is on and the response is not readable
  (:func:`~r1mega.data.readability.rejection_reason`: DeepSeek-R1's cold-start filter);
* prompt + response + EOS does not fit ``train.seq_length`` inputs: a truncated
  response would teach the model to stop mid-thought, so the row is left out instead.

Every rank tokenizes the whole dataset (deterministically, so all ranks agree on the
rows and their lengths without communicating): the batching of a global batch, and with
it the microbatch shapes pipeline stages exchange, follows from the lengths alone.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from r1mega.data.prompts import PromptDataset, PromptExample
from r1mega.data.readability import REASONS, FilterStats, rejection_reason
from r1mega.data.templates import apply_template, check_template
from r1mega.data.tokenizers import Tokenizer
from r1mega.sft.coldstart import (
    BUILTIN_COLDSTART,
    builtin_coldstart_examples,
    is_builtin_coldstart,
)


@dataclass(frozen=True)
class SFTExample:
    """One tokenized row: the templated prompt's ids and the response's ids plus EOS."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]  # ends with EOS
    source: str = ""

    @property
    def ids(self) -> list[int]:
        return [*self.prompt_ids, *self.response_ids]

    @property
    def num_inputs(self) -> int:
        """Model input positions: every token but the last (which is only a label)."""
        return len(self.prompt_ids) + len(self.response_ids) - 1

    def loss_mask(self) -> list[float]:
        """Per input position: 1 where the next token (the label) is a response or EOS
        token. Position ``len(prompt) - 1`` predicts the first response token."""
        prompt = len(self.prompt_ids)
        return [0.0] * (prompt - 1) + [1.0] * len(self.response_ids)


@dataclass
class SFTDataReport:
    """What happened to the rows of the SFT file; printed at start and logged to W&B."""

    path: str
    rows: int = 0  # well-formed rows read
    malformed: Counter = field(default_factory=Counter)  # reason -> count
    first_malformed: str | None = None  # "file:line (reason)" of the first one
    readability: FilterStats | None = None  # None: filter off
    over_length: int = 0  # rows longer than train.seq_length
    kept: int = 0
    seq_length: int = 0

    def lines(self) -> list[str]:
        """Human-readable summary, one fact per line."""
        out = [f"sft data {self.path}: {self.rows} rows read"]
        if self.malformed:
            counts = ", ".join(f"{k}={v}" for k, v in sorted(self.malformed.items()))
            out.append(f"  skipped {sum(self.malformed.values())} malformed rows ({counts}); "
                       f"first: {self.first_malformed}")
        if self.readability is not None:
            stats = self.readability
            dropped = ", ".join(f"{r}={stats.dropped[r]}" for r in REASONS if stats.dropped[r])
            out.append(f"  readability filter: kept {stats.kept} of {stats.seen}"
                       + (f", dropped {dropped}" if dropped else ""))
        if self.over_length:
            out.append(f"  dropped {self.over_length} rows longer than "
                       f"train.seq_length={self.seq_length} tokens")
        out.append(f"  training on {self.kept} rows")
        return out

    def metrics(self) -> dict[str, float]:
        """Counts as flat metrics (``data/...``; logged under ``train/`` by W&B)."""
        out: dict[str, float] = {"data/rows": float(self.rows), "data/kept": float(self.kept),
                                 "data/malformed": float(sum(self.malformed.values())),
                                 "data/over_seq_length": float(self.over_length)}
        if self.readability is not None:
            out["data/readability_dropped"] = float(sum(self.readability.dropped.values()))
            for reason in REASONS:
                out[f"data/readability_{reason}"] = float(self.readability.dropped[reason])
        return out


def read_rows(sft_cfg: Any, seed: int) -> tuple[list[PromptExample], SFTDataReport]:
    """The raw rows of ``sft.train_path`` (the response in ``PromptExample.answer``)."""
    path = sft_cfg.train_path
    if not path:
        raise ValueError("sft.train_path is not set: give a JSONL/Parquet file of "
                         f"prompt/response rows or {BUILTIN_COLDSTART}")
    if is_builtin_coldstart(path):
        rows = builtin_coldstart_examples(seed)
        return rows, SFTDataReport(path=path, rows=len(rows))
    dataset = PromptDataset(path, prompt_field=sft_cfg.prompt_field,
                            answer_field=sft_cfg.response_field, require_answer=True)
    report = SFTDataReport(path=str(path), rows=len(dataset),
                           malformed=Counter(dataset.skip_counts))
    if dataset.skipped:
        first = dataset.skipped[0]
        where = f" row {first.line}" if str(path).endswith(".parquet") else str(first.line)
        report.first_malformed = f"{first.path}:{where} ({first.reason})"
    return list(dataset), report


def tokenize_rows(rows: list[PromptExample], tokenizer: Tokenizer, template: str,
                  seq_length: int, readability: Any | None, report: SFTDataReport
                  ) -> list[SFTExample]:
    """Template, tokenize, filter; fills ``report``'s filter and length counts.

    ``readability``: the ``sft.readability`` config to filter with, or ``None`` (off).
    """
    check_template(template, tokenizer)
    stats = FilterStats() if readability is not None else None
    report.readability, report.seq_length = stats, seq_length
    examples = []
    for row in rows:
        response = row.answer or ""
        response_ids = tokenizer.encode(response)
        if stats is not None:
            reason = rejection_reason(response, len(response_ids), readability)
            stats.add(reason)
            if reason is not None:
                continue
        prompt_ids = tokenizer.encode(apply_template(template, row.prompt, tokenizer))
        example = SFTExample(tuple(prompt_ids), (*response_ids, tokenizer.eos_id), row.source)
        if example.num_inputs > seq_length:
            report.over_length += 1
            continue
        examples.append(example)
    report.kept = len(examples)
    return examples


def load_sft_examples(cfg: Any, tokenizer: Tokenizer) -> tuple[list[SFTExample],
                                                               SFTDataReport]:
    """The training rows of a job config, and the report of what was dropped.

    Raises ``ValueError`` (with the report) when no row survives.
    """
    rows, report = read_rows(cfg.sft, cfg.train.seed)
    readability = cfg.sft.readability if cfg.sft.filter_readability else None
    examples = tokenize_rows(rows, tokenizer, cfg.data.template, cfg.train.seq_length,
                             readability, report)
    if not examples:
        raise ValueError("no SFT rows left to train on:\n" + "\n".join(report.lines()))
    return examples, report
