"""Procedurally generated reasoning tasks shipped with r1mega (no download needed).

Three tasks, chosen by ``data.train_path`` / ``data.eval_path``:

* ``builtin:arithmetic`` -- two-operand integer ``+``/``-``/``*`` with operands up to 99
  (up to 12 for ``*``). Train and eval splits come from disjoint seeds. Too hard for the
  tiny CPU model to learn in minutes; kept for pipeline smoke tests and larger models.
* ``builtin:add_small`` -- single-digit addition, "What is 3 + 4?". A 4-layer, hidden-64
  model can learn it in a couple of CPU minutes even behind the ~430-byte R1-Zero
  template, which is what the end-to-end "RL run that learns" on ``tiny_cpu.yaml`` needs.
  With only 100 distinct problems, disjoint *seeds* would not give a held-out set, so the
  (a, b) pairs themselves are partitioned once, with a fixed seed independent of the run
  seed: the eval split is exactly the held-out pairs and the train split never samples
  them (the tiny base model is pretrained on train pairs only, so eval measures
  generalisation, not memorisation). Every prompt has the same length in bytes, so
  batches of them need no padding.
* ``builtin:count_on`` -- "What is 47 + 6?", where counting on in the ``<think>`` block
  (``47 6, 48 5, ..., 53 0``) is reliable and a one-shot sum is a guess: the task of the
  README's R1-Zero run (:mod:`r1mega.data.count_on`, imported only when a config names
  it): 200 fixed held-out problems, and train draws from the 301 others.

Every example carries ``metadata["expression"]`` (e.g. ``"3 + 4"``), which the warm-start
pretraining (:mod:`r1mega.pretrain`) writes into its short chains of thought.
"""

from __future__ import annotations

import random

from r1mega.data.prompts import PromptExample

BUILTIN_PREFIX = "builtin:"
_SPLIT_SEEDS = {"train": 1, "eval": 2}
ADD_SMALL_MAX_OPERAND = 9
ADD_SMALL_HELD_OUT = 20  # of the 100 (a, b) pairs
_ADD_SMALL_PARTITION_SEED = 20250101  # fixed: the held-out pairs must not depend on any run


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
                                      answer=str(value),
                                      metadata={"task": "arithmetic",
                                                "expression": f"{a} {op} {b}"},
                                      source=f"builtin:arithmetic#{seed}:{i}"))
    return examples


def _check_split(split: str) -> None:
    """Refuse a split name a task would otherwise quietly treat as ``train``."""
    if split not in _SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(_SPLIT_SEEDS)}")


def add_small_pairs(split: str) -> list[tuple[int, int]]:
    """The (a, b) operand pairs of ``split``: ``eval`` gets a fixed random 20 of the 100
    single-digit pairs, ``train`` the other 80 (sorted, so the result is canonical)."""
    _check_split(split)
    pairs = [(a, b) for a in range(ADD_SMALL_MAX_OPERAND + 1)
             for b in range(ADD_SMALL_MAX_OPERAND + 1)]
    random.Random(_ADD_SMALL_PARTITION_SEED).shuffle(pairs)
    chosen = pairs[:ADD_SMALL_HELD_OUT] if split == "eval" else pairs[ADD_SMALL_HELD_OUT:]
    return sorted(chosen)


def add_small(n: int, seed: int, split: str) -> list[PromptExample]:
    """``split`` problems "What is a + b?" with single-digit a, b.

    ``train``: ``n`` problems drawn with replacement from the train pairs, in an order
    given by ``seed``. ``eval``: each held-out pair once (at most ``n``), shuffled by
    ``seed`` -- a fixed, small evaluation set rather than thousands of repeats.
    """
    rng = random.Random(seed)
    pairs = add_small_pairs(split)
    if split == "eval":
        rng.shuffle(pairs)
        chosen = pairs[:n]
    else:
        chosen = [rng.choice(pairs) for _ in range(n)]
    return [PromptExample(index=i, prompt=f"What is {a} + {b}?", answer=str(a + b),
                          metadata={"task": "add_small", "expression": f"{a} + {b}"},
                          source=f"builtin:add_small#{split}:{seed}:{i}")
            for i, (a, b) in enumerate(chosen)]


BUILTIN_TASKS = ("arithmetic", "add_small", "count_on")


def builtin_dataset(path: str, split: str, seed: int, size: int = 4096) -> list[PromptExample]:
    """The examples of a ``builtin:<task>`` data path."""
    _check_split(split)
    name = path[len(BUILTIN_PREFIX):]
    if name == "arithmetic":
        return arithmetic(size, seed=seed * 1000 + _SPLIT_SEEDS[split])
    if name == "add_small":
        return add_small(size, seed=seed * 1000 + _SPLIT_SEEDS[split], split=split)
    if name == "count_on":
        from r1mega.data.count_on import count_on

        return count_on(size, seed=seed * 1000 + _SPLIT_SEEDS[split], split=split)
    raise ValueError(f"data.{split}_path={path!r}: unknown built-in task; known: "
                     + ", ".join(BUILTIN_PREFIX + t for t in BUILTIN_TASKS))
