"""``builtin:column_addition``: a train split and a disjoint held-out split of at least
200 problems, correct answers (checked against the prompt's own numbers), worked and
direct solutions whose arithmetic holds record by record, and the rule rewards verifying
them."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from r1mega.data.column_addition import (
    HELD_OUT,
    direct_text,
    held_out_pairs,
    is_worked,
    records,
    worked_text,
)
from r1mega.data.tasks import BUILTIN_TASKS, builtin_dataset
from tests.distributed import ROOT

PATH = "builtin:column_addition"
PROMPT = re.compile(r"^What is (\d{3})\+(\d{3})\?$")


def operands(prompt: str) -> tuple[int, int]:
    match = PROMPT.match(prompt)
    assert match, prompt
    return int(match.group(1)), int(match.group(2))


def test_registered_and_off_the_import_path_until_used() -> None:
    assert "column_addition" in BUILTIN_TASKS
    # The task module loads only when a config names the task.
    code = ("import sys, r1mega.data.tasks; "
            "assert 'r1mega.data.column_addition' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("seed", [1234, 7])
def test_held_out_split_is_fixed_and_never_trained_on(seed: int) -> None:
    held = builtin_dataset(PATH, "eval", seed)
    train = builtin_dataset(PATH, "train", seed)
    held_pairs = {operands(ex.prompt) for ex in held}
    assert len(held) == len(held_pairs) == HELD_OUT >= 200
    assert held_pairs == set(held_out_pairs())  # the same problems whatever the run seed
    train_pairs = [operands(ex.prompt) for ex in train]
    assert len(train_pairs) == 4096
    assert not held_pairs & set(train_pairs)
    assert len(set(train_pairs)) > 3000  # draws from the ~400k other pairs, not a few


def test_answers_are_the_sums_of_the_prompts_numbers() -> None:
    for split in ("train", "eval"):
        for ex in builtin_dataset(PATH, split, 1234):
            a, b = operands(ex.prompt)
            assert 100 <= a <= 999 and 100 <= b <= 999 and a + b <= 999
            assert ex.answer == str(a + b)
            assert (ex.metadata["a"], ex.metadata["b"]) == (a, b)
    # Splits and seeds give different orders of the train draws.
    assert [e.prompt for e in builtin_dataset(PATH, "train", 1)][:20] != \
        [e.prompt for e in builtin_dataset(PATH, "train", 2)][:20]


def _check_records(a: int, b: int) -> None:
    """Re-do the worked style's arithmetic from its text alone: each record's column sum
    is the operands' last digits plus the carry, the carry is the previous sum's tens,
    the result so far gains the sum's units, and the operands shift by one place."""
    carry, result = 0, ""
    xs, ys = str(a), str(b)
    for i, record in enumerate(records(a, b)):
        x, rest = record.split("+", 1)
        y, rest = rest.split("+", 1)
        c, rest = rest.split("=", 1)
        total, so_far = rest.split(":")
        assert x == "_" * i + xs[:3 - i] and y == "_" * i + ys[:3 - i], record
        assert int(c) == carry
        assert int(total) == int(x[-1]) + int(y[-1]) + carry
        result = total[-1] + result
        assert so_far == result.ljust(3, "_")
        carry = int(total) // 10
    assert int(result) == a + b and carry == 0


def test_worked_records_hold_column_by_column() -> None:
    for ex in builtin_dataset(PATH, "eval", 1234):
        _check_records(*operands(ex.prompt))
    # No carry, a carry through every column, the smallest and largest sums.
    for a, b in [(123, 876), (199, 701), (100, 100), (455, 544)]:
        _check_records(a, b)


def test_rewards_verify_both_styles_and_refuse_a_wrong_sum() -> None:
    from r1mega.rewards import RewardFunction, RewardInput

    problems = builtin_dataset(PATH, "eval", 1234)[:8]
    responses, expected = [], []
    for ex in problems:
        a, b = operands(ex.prompt)
        responses += [worked_text(a, b), direct_text(a, b),
                      direct_text(a, b).replace(f"<answer> {a + b} ", f"<answer> {a + b + 1} ")]
        expected += [1.0, 1.0, 0.0]
        assert is_worked(worked_text(a, b)) and not is_worked(direct_text(a, b))
    rows = [ex for ex in problems for _ in range(3)]
    reward = RewardFunction.from_config({"specs": [{"name": "accuracy", "weight": 1.0},
                                                   {"name": "format", "weight": 1.0}]})
    try:
        _, per_reward = reward([RewardInput(prompt=ex.prompt, response=text,
                                            answer=ex.answer, metadata=dict(ex.metadata),
                                            source=ex.source)
                                for ex, text in zip(rows, responses, strict=True)])
    finally:
        reward.close()
    assert per_reward["accuracy"] == expected
    assert per_reward["format"] == [1.0] * len(rows)
