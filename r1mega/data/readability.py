"""Readability filter for reasoning data (DeepSeek-R1's cold start and rejection sampling).

R1-Zero's outputs are hard to read: languages mix, the reasoning runs on without a
summary, answers drown in formatting. DeepSeek-R1 therefore keeps, for its cold-start
SFT data and its rejection-sampled data, only responses that read well: a reasoning
block followed by a summary for the reader, in one language, of bounded length. This
module decides that for one response and says why it rejects it, so a dataset's
statistics can show what was dropped:

* ``no_think``: the response lacks a closed ``<think>...</think>`` block, or has several;
* ``no_summary``: nothing (but whitespace) follows the reasoning;
* ``mixed_language``: fewer than ``min_language_fraction`` of the response's words are
  in the target language (words as the ``language`` reward counts them; a response
  without any word, such as a bare calculation, passes);
* ``too_long``: more than ``max_response_tokens`` tokens;
* ``empty``: the response is blank.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from r1mega.config.schema import ReadabilityConfig
from r1mega.rewards.extract import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN
from r1mega.rewards.language import language_fraction, words

REASONS = ("empty", "no_think", "no_summary", "mixed_language", "too_long")


def rejection_reason(response: str, num_tokens: int | None,
                     config: ReadabilityConfig) -> str | None:
    """Why ``response`` is not readable (one of :data:`REASONS`), or ``None`` if it is.

    ``config`` is the schema dataclass or the omegaconf node of one (``sft.readability``,
    ``sample.readability``)."""
    if not response.strip():
        return "empty"
    if config.require_think:
        if response.count(THINK_OPEN) != 1 or response.count(THINK_CLOSE) != 1 \
                or response.index(THINK_OPEN) > response.index(THINK_CLOSE):
            return "no_think"
        if config.require_summary and not response.split(THINK_CLOSE, 1)[1].strip():
            return "no_summary"
    text = _without_tags(response)
    # A response without a single word (a bare calculation) mixes no languages.
    if config.language is not None and words(text) and \
            language_fraction(text, config.language) < config.min_language_fraction:
        return "mixed_language"
    if config.max_response_tokens is not None and num_tokens is not None \
            and num_tokens > config.max_response_tokens:
        return "too_long"
    return None


def _without_tags(text: str) -> str:
    """The text without the layout tags (their words are not the response's language)."""
    for tag in (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE):
        text = text.replace(tag, " ")
    return text


@dataclass
class FilterStats:
    """Kept and dropped counts, by reason; ``kept + sum(dropped) == seen``."""

    seen: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)

    def add(self, reason: str | None) -> None:
        self.seen += 1
        if reason is None:
            self.kept += 1
        else:
            self.dropped[reason] += 1

    def as_dict(self) -> dict[str, object]:
        return {"seen": self.seen, "kept": self.kept, "dropped": dict(self.dropped)}
