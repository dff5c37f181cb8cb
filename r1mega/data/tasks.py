"""Procedurally generated reasoning tasks shipped with r1mega (no download needed).

``data.train_path: builtin:arithmetic`` gives two-operand integer arithmetic with exact
answers that the math accuracy reward can verify. Train and eval splits come from
disjoint seeds, so held-out problems are never trained on.
"""

from __future__ import annotations

import random

from r1mega.data.prompts import PromptExample

BUILTIN_PREFIX = "builtin:"
_SPLIT_SEEDS = {"train": 1, "eval": 2}


def is_builtin(path: str | None) -> bool:
    return bool(path) and str(path).startswith(BUILTIN_PREFIX)


def arithmetic(n: int, seed: int, max_operand: int = 99) -> list[PromptExample]:
    """``n`` problems "What is a + b?" / "a - b" / "a * b" (small operands for *)."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        op = rng.choice("+-*")
        hi = max_operand if op != "*" else 12
        a, b = rng.randint(0, hi), rng.randint(0, hi)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        examples.append(PromptExample(index=i, prompt=f"What is {a} {op} {b}?",
                                      answer=str(value), metadata={"task": "arithmetic"},
                                      source=f"builtin:arithmetic#{seed}:{i}"))
    return examples


def builtin_dataset(path: str, split: str, seed: int, size: int = 4096) -> list[PromptExample]:
    """The examples of a ``builtin:<task>`` data path."""
    name = path[len(BUILTIN_PREFIX):]
    if name != "arithmetic":
        raise ValueError(f"data.{split}_path={path!r}: unknown built-in task; known: "
                         f"{BUILTIN_PREFIX}arithmetic")
    return arithmetic(size, seed=seed * 1000 + _SPLIT_SEEDS[split])
