"""``language``: language consistency of the chain of thought (DeepSeek-R1, section 2.3.2).

DeepSeek-R1 adds a reward "calculated as the proportion of target language words in the
CoT" to stop the policy mixing languages. The paper does not define "word", so here:

* the CoT is the content of the first ``<think>`` block (to the end of the text if it is
  not closed; see :func:`r1mega.rewards.extract.think_block`); no think block scores 0;
* words are maximal runs of letters (characters with ``str.isalpha()``, after NFC
  normalisation; digits, punctuation, symbols and whitespace separate words and are not
  words), except that every CJK ideograph is a word on its own -- Chinese has no spaces,
  and counting a whole Chinese sentence as one word would let one English word outweigh
  it;
* a word is English (``target: en``) if it is made of ASCII letters only, and Chinese
  (``target: zh``) if it is a CJK ideograph (U+3400-4DBF, U+4E00-9FFF, U+F900-FAFF,
  U+20000-2EBEF, U+30000-3134F). Everything else (accented Latin, Cyrillic, kana, Hangul,
  ...) counts as another language;
* score = target-language words / all words, 0.0 if there are no words.

The target is ``params.target`` unless the sample's ``metadata["language"]`` names one
(for datasets that mix English and Chinese prompts).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Any, Literal

from r1mega.rewards.base import Reward, RewardInput, RewardResult
from r1mega.rewards.extract import think_block
from r1mega.rewards.registry import register_reward

__all__ = ["LanguageReward", "language_fraction", "words"]

# CJK ideograph blocks: U+3400-4DBF, U+4E00-9FFF, U+F900-FAFF, U+20000-2EBEF, U+30000-3134F.
CJK_RANGES = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2EBEF),
              (0x30000, 0x3134F))
LANGUAGES = ("en", "zh")


def is_cjk_ideograph(ch: str) -> bool:
    code = ord(ch)
    return any(low <= code <= high for low, high in CJK_RANGES)


def words(text: str) -> list[str]:
    """The words of ``text`` as defined in the module docstring.

    One pass over the characters (model output: no regular expression, linear time).
    """
    out: list[str] = []
    run: list[str] = []
    for ch in unicodedata.normalize("NFC", text):
        if ch.isalpha():
            if ch >= "\u3400" and is_cjk_ideograph(ch):
                if run:
                    out.append("".join(run))
                    run = []
                out.append(ch)
            else:
                run.append(ch)
        elif run:
            out.append("".join(run))
            run = []
    if run:
        out.append("".join(run))
    return out


def _is_english(word: str) -> bool:
    return word.isascii()  # words are letters only, so ASCII means [A-Za-z]


def _is_chinese(word: str) -> bool:
    return len(word) == 1 and is_cjk_ideograph(word)


def language_fraction(text: str, target: Literal["en", "zh"]) -> float:
    """Fraction of the words of ``text`` that are in ``target``; 0.0 with no words."""
    tokens = words(text)
    if not tokens:
        return 0.0
    in_target = _is_english if target == "en" else _is_chinese
    return sum(1 for w in tokens if in_target(w)) / len(tokens)


@register_reward("language")
class LanguageReward(Reward):
    """Fraction of chain-of-thought words in ``params.target`` (``en`` or ``zh``)."""

    @dataclass
    class Params:
        target: Literal["en", "zh"] = "en"
        prompt_ends_with_think: bool = False

    def __init__(self, params: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)

    def score(self, sample: RewardInput) -> RewardResult:
        target = sample.metadata.get("language", self.params.target)
        if target not in LANGUAGES:
            return RewardResult(0.0, {"error": f"metadata language {target!r} is not one of "
                                      f"{LANGUAGES}"})
        cot = think_block(sample.response,
                          prompt_ends_with_think=self.params.prompt_ends_with_think)
        if cot is None:
            return RewardResult(0.0, {"no_think": True})
        return RewardResult(language_fraction(cot, target))
