"""Answer normalisation before math verification.

Graders should accept what a reader accepts. math-verify compares mathematical content,
but some everyday notations never reach it as mathematics:

* **currency**: ``\\$5`` (LaTeX's escaped dollar) and symbols such as ``€5`` or ``£5``
  are read as text, so ``\\$5`` did not equal ``5``. Escaped dollars and every Unicode
  currency symbol except the bare ``$`` (a math delimiter) are removed;
* **digits of other scripts**: Arabic-Indic ``٤٢``, Persian ``۴۲``, Devanagari, full-width
  ``４２``, ... are replaced by ASCII digits (every Unicode decimal digit has a value);
* **superscripts and subscripts**: ``7²`` is ``7^{2}`` (49), not ``72``; ``x⁻¹`` is
  ``x^{-1}``; ``a₁`` is ``a_{1}``. Runs of them become one group;
* **compatibility forms**: NFKC folds full-width letters and punctuation, ligatures and
  vulgar fractions (``½`` -> ``1/2``), after the superscripts above are translated
  (NFKC alone would turn ``7²`` into ``72``); ``−`` (U+2212) becomes ``-``.

Every step is a linear pass over the text (no regular expression); the caller caps the
length first.
"""

from __future__ import annotations

import unicodedata

__all__ = ["normalize_answer"]

_SUPERSCRIPTS = dict(zip("⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻⁼⁽⁾ⁿⁱ", "0123456789+-=()ni", strict=True))
_SUBSCRIPTS = dict(zip("₀₁₂₃₄₅₆₇₈₉₊₋₌₍₎", "0123456789+-=()", strict=True))
_FOLD = {ord("\u2212"): "-", ord("\u2044"): "/", ord("\u2215"): "/"}


class _DecimalDigits(dict):
    """``str.translate`` table: any Unicode decimal digit -> its ASCII digit, filled in as
    characters are met (there are ~680 decimal digits; others map to themselves)."""

    def __missing__(self, code: int) -> int | str:
        ch = chr(code)
        value = unicodedata.decimal(ch, None) if ch.isdecimal() and code > 127 else None
        mapped: int | str = str(value) if value is not None else code
        self[code] = mapped
        return mapped


_DIGITS = _DecimalDigits()


def _scripts(text: str) -> str:
    """Runs of superscript (subscript) characters -> ``^{...}`` (``_{...}``)."""
    if not any(ch in _SUPERSCRIPTS or ch in _SUBSCRIPTS for ch in text):
        return text
    out: list[str] = []
    run: list[str] = []
    kind = ""
    for ch in text + "\0":
        now = "^" if ch in _SUPERSCRIPTS else "_" if ch in _SUBSCRIPTS else ""
        if now != kind and run:
            out.append(f"{kind}{{{''.join(run)}}}")
            run = []
        kind = now
        if now:
            run.append((_SUPERSCRIPTS if now == "^" else _SUBSCRIPTS)[ch])
        elif ch != "\0":
            out.append(ch)
    return "".join(out)


def _drop_currency(text: str) -> str:
    text = text.replace("\\$", "")
    if text.isascii():
        return text
    return "".join(ch for ch in text if ch == "$" or unicodedata.category(ch) != "Sc")


def normalize_answer(text: str) -> str:
    """``text`` with the notations in the module docstring brought to plain form."""
    text = _drop_currency(text)
    text = _scripts(text)
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text).translate(_FOLD).translate(_DIGITS)
    return text.strip()
