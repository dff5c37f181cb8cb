"""``builtin:count_on``: a train split and a disjoint held-out split of at least 200
problems, correct answers (checked against the prompt's own numbers), worked solutions
whose counting holds step by step, the base-model text's styles and error rate, and the
rule rewards verifying both styles."""

from __future__ import annotations

import random
import re
import subprocess
import sys

import pytest

from r1mega.data.count_on import (
    HELD_OUT,
    all_pairs,
    base_completion,
    direct_text,
    held_out_pairs,
    is_worked,
    worked_text,
)
from r1mega.data.tasks import BUILTIN_TASKS, builtin_dataset
from tests.distributed import ROOT

PATH = "builtin:count_on"
PROMPT = re.compile(r"^What is (\d{2}) \+ (\d)\?$")


def operands(prompt: str) -> tuple[int, int]:
    match = PROMPT.match(prompt)
    assert match, prompt
    return int(match.group(1)), int(match.group(2))


def test_registered_and_off_the_import_path_until_used() -> None:
    assert "count_on" in BUILTIN_TASKS
    code = "import sys, r1mega.data.tasks; assert 'r1mega.data.count_on' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("seed", [1234, 7])
def test_held_out_split_is_fixed_and_never_trained_on(seed: int) -> None:
    held = builtin_dataset(PATH, "eval", seed)
    train = builtin_dataset(PATH, "train", seed)
    held_pairs = {operands(ex.prompt) for ex in held}
    assert len(held) == len(held_pairs) == HELD_OUT >= 200
    assert held_pairs == set(held_out_pairs())  # the same problems whatever the run seed
    train_pairs = {operands(ex.prompt) for ex in train}
    assert not held_pairs & train_pairs
    # 4096 draws cover every other problem: the two splits partition the task
    assert train_pairs | held_pairs == set(all_pairs())


def test_answers_are_the_sums_of_the_prompts_numbers() -> None:
    for split in ("train", "eval"):
        for ex in builtin_dataset(PATH, split, 1234):
            a, b = operands(ex.prompt)
            assert 10 <= a and 4 <= b <= 9 and a + b <= 99
            assert ex.answer == str(a + b)
            assert (ex.metadata["a"], ex.metadata["b"]) == (a, b)


def _check_counting(a: int, b: int) -> None:
    """Re-do the worked style from its text alone: after restating the problem it starts
    counting at the problem's numbers, each step
    adds one to the running number and takes one from the units left, it stops at 0, and
    the answer is the last running number."""
    think, answer = re.fullmatch(rf" <think> {a} \+ {b}: (.*) </think> <answer> (\d+) </answer>",
                                 worked_text(a, b)).groups()
    steps = [tuple(map(int, step.split(" "))) for step in think.split(", ")]
    assert steps[0] == (a, b) and steps[-1][1] == 0
    for (x, left), (y, now) in zip(steps, steps[1:], strict=False):
        assert (y, now) == (x + 1, left - 1)
    assert int(answer) == steps[-1][0] == a + b


def test_worked_counting_holds_step_by_step() -> None:
    for a, b in all_pairs():
        _check_counting(a, b)


def test_base_text_direct_answers_miss_at_the_stated_rate() -> None:
    """Worked base text is always right; direct answers are right ``direct_correct`` of
    the time and otherwise a near miss (binomial: 4000 draws, 5 sigma)."""
    rng = random.Random(0)
    problems = builtin_dataset(PATH, "train", 3)[:200]
    right = 0
    for i in range(4000):
        ex = problems[i % len(problems)]
        a, b = ex.metadata["a"], ex.metadata["b"]
        assert base_completion(ex, rng, True, 0.2) == worked_text(a, b)
        text = base_completion(ex, rng, False, 0.2)
        value = int(re.search(r"<answer> (-?\d+) ", text).group(1))
        assert text == direct_text(a, b, value) and abs(value - a - b) in (0, 1, 2, 10)
        right += value == a + b
    assert abs(right / 4000 - 0.2) < 5 * (0.2 * 0.8 / 4000) ** 0.5


def test_rewards_verify_both_styles_and_refuse_a_wrong_sum() -> None:
    from r1mega.rewards import RewardFunction, RewardInput

    problems = builtin_dataset(PATH, "eval", 1234)[:8]
    responses, expected = [], []
    for ex in problems:
        a, b = operands(ex.prompt)
        responses += [worked_text(a, b), direct_text(a, b), direct_text(a, b, a + b + 1)]
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
