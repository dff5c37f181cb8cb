"""Pulling the parts of an R1-style response apart: think block, answer block, boxed value.

The R1-Zero template asks for ``<think> reasoning </think> <answer> answer </answer>``.
Responses are model output: tens of thousands of tokens long, and under RL a policy finds
whatever input makes a parser slow (one degenerate rollout that stalls rank 0 stalls every
rank). So every helper here runs in time linear in the text: plain ``str.find`` /
``str.rfind`` scans that never revisit text, and one left-to-right pass for brace
matching. No regular expression is applied to model output (a backtracking pattern such
as ``<think>.*?</think>.*?<answer>`` is cubic on ``"<think></think><answer>" * n``).
``tests/test_reward_bounds.py`` checks this by counting the interpreter's work on 100 KB
adversarial responses.
"""

from __future__ import annotations

__all__ = ["fenced_blocks", "last_answer_block", "last_boxed", "last_code_block",
           "think_block"]

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_BOX_COMMANDS = ("\\boxed", "\\fbox")
FENCE = "```"


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


def _brace_matches(text: str) -> dict[int, int]:
    """``{position of '{': position of its matching '}'}`` for every closed group.

    One pass with a stack. Backslash-escaped braces (``\\{``, ``\\}``) are literal
    characters in LaTeX, not grouping: a backslash makes the next character inert.
    """
    positions: list[int] = []
    for ch in "\\{}":
        j = text.find(ch)
        while j >= 0:
            positions.append(j)
            j = text.find(ch, j + 1)
    positions.sort()
    matches: dict[int, int] = {}
    stack: list[int] = []
    inert_until = 0  # a backslash at p makes p + 1 an ordinary character
    for p in positions:
        if p < inert_until:
            continue
        ch = text[p]
        if ch == "\\":
            inert_until = p + 2
        elif ch == "{":
            stack.append(p)
        elif stack:
            matches[stack.pop()] = p
    return matches


def _box_openings(text: str) -> list[int]:
    """Positions of the ``{`` opening each ``\\boxed{`` / ``\\fbox{`` (whitespace allowed
    between the command and the brace), in text order."""
    openings = []
    for command in _BOX_COMMANDS:
        start = text.find(command)
        while start >= 0:
            j = start + len(command)
            while j < len(text) and text[j].isspace():
                j += 1
            if j < len(text) and text[j] == "{":
                openings.append(j)
            start = text.find(command, max(j, start + 1))
    return sorted(openings)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces.

    Nested groups are kept whole (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``). A boxed
    group that never closes (truncated output) is skipped in favour of an earlier one.
    """
    openings = _box_openings(text)
    if not openings:
        return None
    matches = _brace_matches(text)
    for open_pos in reversed(openings):
        close = matches.get(open_pos)
        if close is not None:
            return text[open_pos + 1 : close]
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


def _fence_language(info: str) -> str:
    """The language tag of a fence's info string: after leading blanks, the run of word
    characters, ``+`` and ``-`` (```` ```python3 extra```` -> ``python3``)."""
    i = 0
    while i < len(info) and info[i] in " \t":
        i += 1
    j = i
    while j < len(info) and (info[j].isalnum() or info[j] in "_+-"):
        j += 1
    return info[i:j]


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced code block, in order.

    A block opens at ```` ``` ````, its info string runs to the end of that line, and its
    body runs to the next ```` ``` ````; scanning resumes after the closing fence. Each
    character is looked at a bounded number of times.
    """
    blocks = []
    pos = 0
    while True:
        start = text.find(FENCE, pos)
        if start < 0:
            break
        newline = text.find("\n", start + len(FENCE))
        if newline < 0:
            break  # no line break after this fence, so none after any later one either
        close = text.find(FENCE, newline + 1)
        if close < 0:
            break
        blocks.append((_fence_language(text[start + len(FENCE) : newline]),
                       text[newline + 1 : close]))
        pos = close + len(FENCE)
    return blocks


_PYTHON_LANGS = {"", "python", "python3", "py"}


def last_code_block(text: str) -> str | None:
    """Body of the last fenced code block tagged python (or untagged), or None."""
    bodies = [body for lang, body in fenced_blocks(text) if lang.lower() in _PYTHON_LANGS]
    return bodies[-1] if bodies else None
