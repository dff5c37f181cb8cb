"""R1-Zero's signature on the README's run: held-out accuracy rises and responses grow.

The README's run command, ``r1mega train configs/r1_zero_tiny_cpu.yaml``, with a fixed
seed and everything in temporary directories: the base model is pretrained from nothing
(as in a fresh clone) by ``tools/pretrain_tiny.py`` (the ``count_on_base_model``
fixture; the run finds it cached exactly as ``warm_start:`` would leave it), then GRPO
runs the config's 25 steps with its held-out evaluation (``eval.*``: 64 of the 200
``builtin:count_on`` problems never trained on, k=4 samples each at the R1 protocol,
T=0.6 and top-p 0.95), here before the first step and after the last.

The base model answers "What is 47 + 6?" directly most of the time (a guess, right ~10% of
the time) and counts on in its ``<think>`` block ~20% of the time (right ~95%). Nothing
rewards the style; the accuracy reward pays for right answers, which the worked style
gives, and RL shifts the policy to it: held-out pass@1 rises, and so does the length.

Measured 2026-12-06 (shared 2-core machine, OMP_NUM_THREADS=1; base model and RL with the
same seed; the README's recipe: ``r1mega/pretrain.py``'s count_on defaults, lr 3e-4), the
run's own evaluation at steps 0, 5, ..., 25:

    seed 1234 (this test)  pass@1 0.270 0.559 0.731 0.926 0.981 0.988
                           length  59.0  71.6  83.2  89.6  91.3  91.6  (1.55x)
    seed 1235              pass@1 0.293 0.574 0.840 0.902 0.922 0.930
                           length  61.6  75.2  87.4  90.6  91.3  91.5  (1.49x)
    seed 1236              pass@1 0.207 0.641 0.879 0.934 0.879 0.938
                           length  58.2  77.3  88.5  91.0  91.0  91.0  (1.56x)

All 200 held-out problems at k=16 (``r1mega eval``), step 0 -> 25: see the README's table.
The earlier recipe (2026-12-03: full-template rows weighted as short ones, half the rows
worked, lr 2e-4) ended at 0.918, 0.660 and 0.043 for these seeds: seed 1236's base model
could not count on under the full template, and seed 1235's was right about two thirds
of the time when it did.

``MIN_GAIN`` is under half the smallest gain of the three seeds (0.64): one evaluation
(256 samples on 64 problems) has a sampling error of ~0.03, and on another machine the
floating-point path, so the trajectory, may differ as a seed would. ``MIN_FINAL`` is the
issue's bar (0.70) against 0.93-0.99 measured; the worked-style share and the length ratio
are asserted with margins of the same kind.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from r1mega.data.count_on import is_worked
from tests.test_cli import (
    WANDB_METRICS,
    eval_tables,
    offline_run_history,
    offline_run_keys,
    r1mega,
    rescored_pass_at_1,
)

CONFIG = "configs/r1_zero_tiny_cpu.yaml"
SEED = 1234
STEPS = 25  # the config's train.steps, fixed here so the numbers above hold
# The config evaluates every 5 steps (the README's curve); here only before the first step
# and after the last: each evaluation is ~12 s of CI.
EVAL_STEPS = [0, STEPS]
PROBLEMS, K = 64, 4  # eval.limit, eval.k
MIN_GAIN = 0.3  # held-out pass@1, absolute (measured: 0.72, 0.64, 0.73)
MIN_FINAL = 0.7  # held-out pass@1 after the last step (measured: 0.99, 0.93, 0.94)
MIN_WORKED_GAIN = 0.4  # share of worked responses, absolute (measured: see the README)
MIN_LENGTH_RATIO = 1.3  # mean response length, last evaluation over the first (1.49-1.56)


def test_r1_zero_tiny_run_raises_held_out_accuracy_and_response_length(
        tmp_path: Path, count_on_base_model: Path) -> None:
    base = count_on_base_model
    reused = (base / "meta.json").read_text()
    out = r1mega("train", CONFIG, f"train.seed={SEED}", f"checkpoint.load=warm_start:{base}",
                 f"checkpoint.save_dir={tmp_path / 'ck'}", f"logging.wandb_dir={tmp_path}",
                 f"eval.interval={STEPS}", f"eval.table_rows={PROBLEMS * K}", timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    # The run started from the cached base model, not from a retrained one.
    assert (base / "meta.json").read_text() == reused and (base / "weights").is_dir()
    assert sum(line.startswith("step ") for line in out.stdout.splitlines()) == STEPS
    assert sum(line.startswith("eval step ") for line in out.stdout.splitlines()) == \
        len(EVAL_STEPS)

    evals = [row for row in offline_run_history(tmp_path) if "eval/pass_at_1" in row]
    assert [int(float(row["train/step"])) for row in evals] == EVAL_STEPS
    assert all(float(row["eval/problems"]) == PROBLEMS and float(row["eval/k"]) == K
               for row in evals)
    pass_at_1 = [float(row["eval/pass_at_1"]) for row in evals]
    lengths = [float(row["eval/response_length"]) for row in evals]
    # pass@1 re-scored from every logged response with math-verify, independently of
    # the accuracy reward.
    tables = eval_tables(tmp_path)
    assert [len(table) for table in tables] == [PROBLEMS * K] * len(EVAL_STEPS)
    for table, value in zip(tables, pass_at_1, strict=True):
        assert rescored_pass_at_1(table) == pytest.approx(value, abs=1e-12)
    worked = [sum(is_worked(r["response"]) for r in table) / len(table) for table in tables]
    report = (f"held-out pass@1 {' '.join(f'{p:.3f}' for p in pass_at_1)}; mean length "
              f"{' '.join(f'{n:.1f}' for n in lengths)}; worked style "
              f"{' '.join(f'{w:.2f}' for w in worked)}")
    print(report)
    # The base model is mostly wrong (R1-Zero starts low), and RL raises it...
    assert pass_at_1[0] <= 0.35, report
    assert pass_at_1[-1] >= pass_at_1[0] + MIN_GAIN, report
    assert pass_at_1[-1] >= MIN_FINAL, report
    # ...by reasoning longer: the worked style takes over, and responses grow.
    assert worked[-1] >= worked[0] + MIN_WORKED_GAIN, report
    assert lengths[-1] >= MIN_LENGTH_RATIO * lengths[0], report

    missing = set(WANDB_METRICS) - offline_run_keys(tmp_path)
    assert not missing, missing

    # The README's figure is redrawn from these W&B files: the held-out curves in it are
    # the evaluations above.
    from tools.plot_run import EVAL_LENGTH, EVAL_PASS, curves, find_run, plot, read_history

    data = curves(read_history(find_run(tmp_path)))
    assert data[EVAL_PASS] == ([float(s) for s in EVAL_STEPS], pass_at_1)
    assert data[EVAL_LENGTH][1] == lengths
    plot(data, tmp_path / "curves.png", "test")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
