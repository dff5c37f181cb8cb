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

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from r1mega.rewards.base import Reward, RewardInput, RewardResult
from r1mega.rewards.extract import think_block
from r1mega.rewards.registry import register_reward

__all__ = ["LanguageReward", "language_fraction", "words"]

CJK_RANGES = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef\U00030000-\U0003134f"
_CJK_CHAR = f"[{CJK_RANGES}]"
# One CJK ideograph, or a run of word characters that are neither CJK ideographs nor
# decimal digits nor "_". That run may still hold non-letters such as "²" (\w includes
# all numerics); words() splits those out, which is rare enough to do in Python.
_WORD_RE = re.compile(f"{_CJK_CHAR}|(?:(?!{_CJK_CHAR})[^\\W\\d_])+")
_EN_RE = re.compile(r"[A-Za-z]+")
_ZH_RE = re.compile(_CJK_CHAR)
LANGUAGES = ("en", "zh")


def words(text: str) -> list[str]:
    """The words of ``text`` as defined in the module docstring."""
    out: list[str] = []
    for token in _WORD_RE.findall(unicodedata.normalize("NFC", text)):
        if token.isalpha():
            out.append(token)
        else:
            out.extend("".join(ch if ch.isalpha() else " " for ch in token).split())
    return out


def language_fraction(text: str, target: Literal["en", "zh"]) -> float:
    """Fraction of the words of ``text`` that are in ``target``; 0.0 with no words."""
    tokens = words(text)
    if not tokens:
        return 0.0
    pattern = _EN_RE if target == "en" else _ZH_RE
    return sum(1 for w in tokens if pattern.fullmatch(w)) / len(tokens)


@register_reward("language")
class LanguageReward(Reward):
    """Fraction of chain-of-thought words in ``params.target`` (``en`` or ``zh``)."""

    @dataclass
    class Params:
        target: Literal["en", "zh"] = "en"
        prompt_ends_with_think: bool = False

    def __init__(self, params: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)

    def __call__(self, samples: Sequence[RewardInput]) -> list[RewardResult]:
        out = []
        for s in samples:
            target = s.metadata.get("language", self.params.target)
            if target not in LANGUAGES:
                error = f"metadata language {target!r} is not one of {LANGUAGES}"
                out.append(RewardResult(0.0, {"error": error}))
                continue
            cot = think_block(s.response, prompt_ends_with_think=self.params.prompt_ends_with_think)
            if cot is None:
                out.append(RewardResult(0.0, {"no_think": True}))
            else:
                out.append(RewardResult(language_fraction(cot, target)))
        return out
