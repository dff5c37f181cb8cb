"""``builtin:column_addition``: three-digit addition, where working it out pays.

"What is 345+278?" (both operands 100..999, sum at most 999). A model can answer it two
ways:

* **direct** -- the sum at once::

      <think> 345+278=623 </think> <answer> 623 </answer>

  Every digit of the sum depends on the carries below it, which a small model has to
  work out in one token.
* **worked** -- column by column, units first, one fixed-width record per column::

      <think> 345+278+0=13:3__, _34+_27+1=12:23_, __3+__2+1=06:623 </think> <answer> 623 </answer>

  A record is ``<the operands' remaining digits>+<carry in>=<column sum>:<result so far>``;
  the next record shifts the operands one place (``_`` pads) and carries the tens digit.
  Every step is a single-digit sum or a copy from the same place in the record before,
  so the procedure is reliable on problems never seen, and about three times as long.

:func:`direct_text` and :func:`worked_text` write both styles (for base-model text and
for inspecting samples); :func:`is_worked` tells them apart in a response. The accuracy
reward checks only the ``<answer>`` block, so RL can prefer whichever style is right
more often.

The held-out split is :data:`HELD_OUT` fixed operand pairs, drawn with a seed of their
own (the same for every run seed); the train split draws from all other pairs and never
samples one of them, so held-out accuracy measures the procedure, not memory. Every
prompt has the same shape, so batches of them need no padding.
"""

from __future__ import annotations

import random

from r1mega.data.prompts import PromptExample

TASK = "column_addition"
DIGITS = 3
HELD_OUT = 256  # held-out problems: pass@1 over them has a sampling error of ~0.01
_PARTITION_SEED = 20261203  # fixed: the held-out pairs must not depend on any run
PAD = "_"
LOW, HIGH = 10 ** (DIGITS - 1), 10 ** DIGITS - 1


def draw_pair(rng: random.Random) -> tuple[int, int]:
    """A uniformly random problem: two ``DIGITS``-digit operands whose sum has as many."""
    while True:
        a, b = rng.randint(LOW, HIGH), rng.randint(LOW, HIGH)
        if a + b <= HIGH:
            return a, b


def held_out_pairs() -> list[tuple[int, int]]:
    """The :data:`HELD_OUT` problems of the eval split (sorted: the set is canonical)."""
    rng = random.Random(_PARTITION_SEED)
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < HELD_OUT:
        pairs.add(draw_pair(rng))
    return sorted(pairs)


def example(index: int, a: int, b: int, split: str, seed: int) -> PromptExample:
    return PromptExample(index=index, prompt=f"What is {a}+{b}?", answer=str(a + b),
                         metadata={"task": TASK, "a": a, "b": b, "expression": f"{a}+{b}"},
                         source=f"builtin:{TASK}#{split}:{seed}:{index}")


def column_addition(n: int, seed: int, split: str) -> list[PromptExample]:
    """``split`` problems. ``train``: ``n`` draws (with replacement) from every pair but the
    held-out ones, ordered by ``seed``. ``eval``: each held-out pair once (at most ``n``),
    shuffled by ``seed``."""
    rng = random.Random(seed)
    held = held_out_pairs()
    if split == "eval":
        rng.shuffle(held)
        return [example(i, a, b, split, seed) for i, (a, b) in enumerate(held[:n])]
    excluded = set(held)
    examples: list[PromptExample] = []
    while len(examples) < n:
        a, b = draw_pair(rng)
        if (a, b) not in excluded:
            examples.append(example(len(examples), a, b, split, seed))
    return examples


def records(a: int, b: int) -> list[str]:
    """The worked style's column records of ``a + b``, units first."""
    x, y, carry, result = str(a), str(b).rjust(DIGITS, "0"), 0, ""
    out = []
    for _ in range(DIGITS):
        total = int(x[-1]) + int(y[-1]) + carry
        result = str(total % 10) + result
        out.append(f"{x}+{y}+{carry}={total:02d}:{result.ljust(DIGITS, PAD)}")
        x, y, carry = PAD + x[:-1], PAD + y[:-1], total // 10
    return out


def answer_block(value: int) -> str:
    return f" </think> <answer> {value} </answer>"


def direct_text(a: int, b: int) -> str:
    """The direct style's completion (it follows the template's ``Assistant:``)."""
    return f" <think> {a}+{b}={a + b}{answer_block(a + b)}"


def worked_text(a: int, b: int) -> str:
    """The worked style's completion."""
    return f" <think> {', '.join(records(a, b))}{answer_block(a + b)}"


def is_worked(response: str) -> bool:
    """Whether a response took the worked style (its think block holds a column record)."""
    think = response.split("</think>", 1)[0]
    return "=" in think and ":" in think.split("=", 1)[1]
