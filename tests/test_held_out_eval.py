"""When the in-training held-out evaluation runs and which responses its table keeps
(the evaluation itself runs in tests/test_cli.py, test_resume.py and test_rl_learns.py)."""

from __future__ import annotations

from r1mega.held_out_eval import eval_due, table_order


def test_evaluations_at_step_zero_every_interval_and_the_last_step() -> None:
    assert [s for s in range(0, 12) if eval_due(s, 4, 11)] == [0, 4, 8, 11]
    assert [s for s in range(0, 9) if eval_due(s, 4, 8)] == [0, 4, 8]
    assert not any(eval_due(s, 0, 8) for s in range(0, 9))  # interval 0: off


def test_table_shows_one_sample_per_problem_first() -> None:
    # 3 problems x k=2, problem-major: rows 0,1 are problem 0's samples.
    assert table_order(3, 2, 4) == [0, 2, 4, 1]
    assert sorted(table_order(3, 2, 100)) == list(range(6))
    assert table_order(3, 2, 0) == []
