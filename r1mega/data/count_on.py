"""``builtin:count_on``: two-digit plus one-digit addition, where counting on pays.

"What is 47 + 6?" (``a`` in 10..95, ``b`` in 4..9, ``a + b`` at most 99). A model can
answer in two styles:

* **direct** -- the sum at once::

      <think> 47 + 6 = 53 </think> <answer> 53 </answer>

* **worked** -- counting on from ``a``, one step per unit of ``b``, each step writing the
  running number and how many units are left::

      <think> 47 + 6: 47 6, 48 5, 49 4, 50 3, 51 2, 52 1, 53 0 </think> <answer> 53 </answer>

  The first step restates the problem; every later one depends only on the step before
  it, at the same distance (add one, take one away; stop at 0): the same few operations
  on every problem, so the procedure carries over to problems never seen. It is longer,
  by six tokens per unit of ``b`` with the byte tokenizer.

A small model's one-shot sum is a guess near the answer; the base-model text
(:func:`base_completion`) writes direct answers that way (right ``direct_correct`` of
the time, otherwise off by one, two or ten), and worked ones always right, because each
step is. RL then finds that the worked style earns the accuracy reward, and responses
grow -- the R1-Zero signature. The accuracy reward checks only the ``<answer>`` block;
nothing rewards the style itself.

The held-out split is :data:`HELD_OUT` fixed problems, drawn with a seed of their own
(the same for every run seed); the train split draws from all other problems and never
samples one of them. Every prompt has the same length, so batches need no padding.
"""

from __future__ import annotations

import random

from r1mega.data.prompts import PromptExample

TASK = "count_on"
HELD_OUT = 200  # of the 501 problems: pass@1 over them has a sampling error of ~0.01-0.03
_PARTITION_SEED = 20261203  # fixed: the held-out problems must not depend on any run
A_RANGE = (10, 95)
B_RANGE = (4, 9)
GUESS_OFFSETS = (-10, -2, -1, 1, 2, 10)  # a one-shot sum's slips: a unit or a carry


def all_pairs() -> list[tuple[int, int]]:
    """Every problem ``(a, b)``: two-digit ``a``, one-digit ``b``, a two-digit sum."""
    return [(a, b) for a in range(A_RANGE[0], A_RANGE[1] + 1)
            for b in range(B_RANGE[0], B_RANGE[1] + 1) if a + b <= 99]


def held_out_pairs() -> list[tuple[int, int]]:
    """The :data:`HELD_OUT` problems of the eval split (sorted: the set is canonical)."""
    pairs = all_pairs()
    random.Random(_PARTITION_SEED).shuffle(pairs)
    return sorted(pairs[:HELD_OUT])


def example(index: int, a: int, b: int, split: str, seed: int) -> PromptExample:
    return PromptExample(index=index, prompt=f"What is {a} + {b}?", answer=str(a + b),
                         metadata={"task": TASK, "a": a, "b": b, "expression": f"{a} + {b}"},
                         source=f"builtin:{TASK}#{split}:{seed}:{index}")


def count_on(n: int, seed: int, split: str) -> list[PromptExample]:
    """``split`` problems. ``train``: ``n`` draws (with replacement) from every problem but
    the held-out ones, ordered by ``seed``. ``eval``: each held-out problem once (at most
    ``n``), shuffled by ``seed``."""
    rng = random.Random(seed)
    held = held_out_pairs()
    if split == "eval":
        rng.shuffle(held)
        return [example(i, a, b, split, seed) for i, (a, b) in enumerate(held[:n])]
    excluded = set(held)
    train = [pair for pair in all_pairs() if pair not in excluded]
    return [example(i, *rng.choice(train), split, seed) for i in range(n)]


def answer_block(value: int) -> str:
    return f" </think> <answer> {value} </answer>"


def steps(a: int, b: int) -> list[str]:
    """The worked style's counting steps: the running number and the units left, from
    ``a b`` (the problem itself) to ``a+b 0``."""
    return [f"{a + i} {b - i}" for i in range(b + 1)]


def direct_text(a: int, b: int, value: int | None = None) -> str:
    """The direct style's completion (it follows the template's ``Assistant:``), stating
    ``value`` (the sum unless given)."""
    value = a + b if value is None else value
    return f" <think> {a} + {b} = {value}{answer_block(value)}"


def worked_text(a: int, b: int) -> str:
    """The worked style's completion."""
    return f" <think> {a} + {b}: {', '.join(steps(a, b))}{answer_block(a + b)}"


def is_worked(response: str) -> bool:
    """Whether a response took the worked style (its think block counts on)."""
    return "," in response.split("</think>", 1)[0]


def base_completion(example: PromptExample, rng: random.Random, worked: bool,
                    direct_correct: float) -> str:
    """A base-model completion of ``example`` in the given style: worked ones are right,
    direct ones right with probability ``direct_correct`` and otherwise a near miss."""
    a, b = example.metadata["a"], example.metadata["b"]
    if worked:
        return worked_text(a, b)
    value = a + b
    if rng.random() >= direct_correct:
        value += rng.choice(GUESS_OFFSETS)
    return direct_text(a, b, value)
