"""The built-in ``add_small`` task: single-digit addition whose held-out pairs are never
trained on, the same for every run seed, and deterministic."""

from __future__ import annotations

import pytest

from r1mega.data.tasks import add_small, add_small_pairs, builtin_dataset

PATH = "builtin:add_small"
# Part of the task's definition: cached base models and every reported held-out number
# assume these 20 pairs. Changing them needs r1mega.pretrain.FORMAT_VERSION bumped.
HELD_OUT = [(0, 5), (1, 1), (2, 1), (2, 8), (3, 1), (3, 3), (3, 5), (3, 9), (4, 6), (4, 8),
            (5, 7), (6, 2), (6, 5), (6, 8), (7, 0), (7, 7), (8, 1), (8, 9), (9, 2), (9, 4)]


def _pair(prompt: str) -> tuple[int, int]:
    a, b = prompt.removeprefix("What is ").removesuffix("?").split(" + ")
    return int(a), int(b)


def test_pairs_partition_all_single_digit_sums() -> None:
    train, held_out = add_small_pairs("train"), add_small_pairs("eval")
    assert held_out == HELD_OUT
    assert len(train) == 80 and not set(train) & set(held_out)
    assert set(train) | set(held_out) == {(a, b) for a in range(10) for b in range(10)}


@pytest.mark.parametrize("seed", [0, 1, 1234])
def test_train_split_never_samples_a_held_out_pair(seed: int) -> None:
    train = builtin_dataset(PATH, "train", seed)
    assert len(train) == 4096
    pairs = {_pair(ex.prompt) for ex in train}
    assert not pairs & set(HELD_OUT)
    assert pairs == set(add_small_pairs("train"))  # 4096 draws cover all 80


@pytest.mark.parametrize("seed", [0, 1234])
def test_eval_split_is_each_held_out_pair_once(seed: int) -> None:
    examples = builtin_dataset(PATH, "eval", seed)
    assert sorted(_pair(ex.prompt) for ex in examples) == HELD_OUT
    assert len(builtin_dataset(PATH, "eval", seed, size=5)) == 5


def test_examples_are_correct_and_uniform() -> None:
    examples = builtin_dataset(PATH, "train", 3, size=200) + builtin_dataset(PATH, "eval", 3)
    for ex in examples:
        a, b = _pair(ex.prompt)
        assert ex.answer == str(a + b)
        assert ex.metadata == {"task": "add_small", "expression": f"{a} + {b}"}
    assert {len(ex.prompt) for ex in examples} == {len("What is 3 + 4?")}


def test_deterministic_for_a_seed() -> None:
    def problems(split: str, seed: int) -> list[tuple[str, str | None]]:
        return [(ex.prompt, ex.answer) for ex in builtin_dataset(PATH, split, seed, size=64)]

    for split in ("train", "eval"):
        assert problems(split, 5) == problems(split, 5)
        assert problems(split, 5) != problems(split, 6)  # the order follows the seed
    assert builtin_dataset(PATH, "train", 5)[0].source == "builtin:add_small#train:5001:0"


def test_unknown_split_or_task_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown split 'test'"):
        builtin_dataset(PATH, "test", 0)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        add_small(4, 0, "test")
    with pytest.raises(ValueError, match="builtin:arithmetic, builtin:add_small"):
        builtin_dataset("builtin:add_large", "train", 0)
