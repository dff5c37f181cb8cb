"""Pulling the parts of an R1-style response apart: think block, answer block, boxed value.

The R1-Zero template asks for ``<think> reasoning </think> <answer> answer </answer>``.
These helpers are deliberately simple string scans (no regex backtracking over the whole
response), because responses can be tens of thousands of tokens long.
"""

from __future__ import annotations

import re

__all__ = ["last_answer_block", "last_boxed", "last_code_block", "think_block"]

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def last_answer_block(text: str) -> str | None:
    """Content of the last complete ``<answer>...</answer>`` block, or None.

    Scanning back from the last ``</answer>`` to the nearest ``<answer>`` picks the
    innermost block when a model nests or repeats tags; the policy's final word counts.
    """
    end = text.rfind(ANSWER_CLOSE)
    if end < 0:
        return None
    start = text.rfind(ANSWER_OPEN, 0, end)
    if start < 0:
        return None
    return text[start + len(ANSWER_OPEN) : end]


def _balanced_group(text: str, open_pos: int) -> str | None:
    """Content of the ``{...}`` group whose ``{`` is at ``open_pos``; None if unclosed.

    Backslash-escaped braces (``\\{``, ``\\}``) are literal characters in LaTeX, not
    grouping, so they do not change the depth.
    """
    depth = 0
    i = open_pos
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : i]
        i += 1
    return None


_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces.

    Nested groups are kept whole (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``). A boxed
    group that never closes (truncated output) is skipped in favour of an earlier one.
    """
    starts = [m.end() - 1 for m in _BOXED_RE.finditer(text)]
    for open_pos in reversed(starts):
        content = _balanced_group(text, open_pos)
        if content is not None:
            return content
    return None


def think_block(text: str, *, prompt_ends_with_think: bool = False) -> str | None:
    """The chain of thought: text between the first ``<think>`` and the next ``</think>``.

    An unclosed think block (generation truncated mid-thought) still counts up to the end
    of the text. With ``prompt_ends_with_think`` the response is taken to start inside the
    block, as with the R1-Zero template that ends in ``Assistant: <think>``.
    """
    if prompt_ends_with_think:
        text = THINK_OPEN + text
    start = text.find(THINK_OPEN)
    if start < 0:
        return None
    start += len(THINK_OPEN)
    end = text.find(THINK_CLOSE, start)
    return text[start:] if end < 0 else text[start:end]


_FENCE_RE = re.compile(r"```[ \t]*(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)```", re.DOTALL)
_PYTHON_LANGS = {"", "python", "python3", "py"}


def last_code_block(text: str) -> str | None:
    """Body of the last fenced code block tagged python (or untagged), or None."""
    bodies = [
        m.group("body")
        for m in _FENCE_RE.finditer(text)
        if m.group("lang").lower() in _PYTHON_LANGS
    ]
    return bodies[-1] if bodies else None
