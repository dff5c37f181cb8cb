"""Kill-and-resume: a run SIGKILLed after step k and restarted gives the same weights at
step k+2 as an uninterrupted run, even when newer checkpoints on disk are corrupt (they
are reported, set aside and the intact one is used); a partial checkpoint is never
resumed from."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from r1mega.checkpointing.train_state import META, find_latest_checkpoint, step_dir
from tests.distributed import ROOT, run_torchrun

# Random-init policies score 0 on accuracy/format; the language reward (fraction of
# English words in the sampled bytes) varies per sample, so every step moves the weights.
OVERRIDES = [
    # From random weights: resuming must be exact whatever the start.
    "checkpoint.load=null",
    "train.steps=3", "checkpoint.save_interval=1", "rollout.max_new_tokens=8",
    "rewards.specs=[{name: language, weight: 1.0, params: {target: en, "
    "prompt_ends_with_think: true}}]",
    # Held-out evaluation after every step: a resumed run's points equal the straight run's.
    "eval.interval=1", "eval.k=2", "eval.limit=2", "eval.max_new_tokens=4",
]


def _train(save_dir: Path, *extra: str, env: dict[str, str] | None = None):
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    for var in ("RANK", "WORLD_SIZE"):
        full_env.pop(var, None)
    return subprocess.run(
        [sys.executable, "-m", "r1mega.cli", "train", "configs/tiny_cpu.yaml", *OVERRIDES,
         f"checkpoint.save_dir={save_dir}", *extra],
        capture_output=True, text=True, timeout=600, env=full_env, cwd=ROOT)


def test_killed_run_resumes_to_identical_weights(tmp_path: Path) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    ok = _train(straight)
    assert ok.returncode == 0, ok.stderr[-4000:]
    assert "step 3/3" in ok.stdout

    crash = _train(killed, env={"R1MEGA_KILL_AFTER_STEP": "1"})
    assert crash.returncode != 0
    assert "step 1/3" in crash.stdout and "step 2/3" not in crash.stdout
    assert find_latest_checkpoint(killed) == step_dir(killed, 1)
    # Newer checkpoints, damaged on disk: a truncated shard (step 2) and a garbled
    # completion marker (step 3). The restart reports both, sets them aside and resumes
    # from step 1 instead of crashing on every requeue.
    for step in (2, 3):
        shutil.copytree(step_dir(straight, step), step_dir(killed, step))
    shard = sorted(step_dir(killed, 2).glob("__*_0.distcp"))[-1]
    os.truncate(shard, shard.stat().st_size // 2)
    (step_dir(killed, 3) / META).write_text("{")
    (killed / "latest").write_text(step_dir(killed, 3).name)  # as the saving run left it

    resumed = _train(killed)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"{step_dir(killed, 3)} is corrupt ({META} is unreadable" in resumed.stdout
    assert f"{step_dir(killed, 2)} is corrupt ({shard.name} has" in resumed.stdout
    assert (killed / "step_00000002.corrupt").is_dir()
    assert "resumed from" in resumed.stdout and "(step 1)" in resumed.stdout
    assert "step 1/3" not in resumed.stdout.split("resumed from")[1]
    assert "step 3/3" in resumed.stdout
    # Same reported metrics for the steps both runs trained.
    for step in ("step 2/3", "step 3/3"):
        line_a = next(x for x in ok.stdout.splitlines() if x.startswith(step))
        line_b = next(x for x in resumed.stdout.splitlines() if x.startswith(step))
        assert line_a.split(" | tok/s")[0] == line_b.split(" | tok/s")[0]
    after_resume = resumed.stdout.split("resumed from")[1]
    assert "eval step 0/3" not in after_resume and "eval step 1/3" not in after_resume
    for step in ("eval step 2/3", "eval step 3/3"):
        line_a = next(x for x in ok.stdout.splitlines() if x.startswith(step))
        line_b = next(x for x in after_resume.splitlines() if x.startswith(step))
        assert line_a.split(" | time")[0] == line_b.split(" | time")[0]

    out = tmp_path / "diff.json"
    run_torchrun(1, ROOT / "tests" / "workers" / "compare_checkpoints.py",
                 "configs/tiny_cpu.yaml", step_dir(straight, 3), step_dir(killed, 3), out)
    result = json.loads(out.read_text())
    assert result["num_tensors"] > 10
    assert result["max_abs_diff"] == 0.0, result

    # The weights did move (the test would be vacuous otherwise).
    run_torchrun(1, ROOT / "tests" / "workers" / "compare_checkpoints.py",
                 "configs/tiny_cpu.yaml", step_dir(straight, 2), step_dir(straight, 3), out)
    assert json.loads(out.read_text())["max_abs_diff"] > 0


def test_partial_checkpoint_is_never_picked(tmp_path: Path) -> None:
    done = step_dir(tmp_path, 4)
    done.mkdir(parents=True)
    (done / META).write_text(json.dumps({"step": 4, "world_size": 2}))
    partial = tmp_path / "step_00000005.partial"
    partial.mkdir()
    (partial / META).write_text("{}")
    no_meta = step_dir(tmp_path, 6)  # killed while ranks were still writing
    no_meta.mkdir()
    assert find_latest_checkpoint(tmp_path) == done
    (tmp_path / "latest").write_text(no_meta.name)  # stale pointer to an incomplete one
    assert find_latest_checkpoint(tmp_path) == done
    assert find_latest_checkpoint(tmp_path / "missing") is None


def test_sigusr1_checkpoints_and_exits_for_requeue(tmp_path: Path) -> None:
    """Slurm's --signal=USR1 (here sent to the local launcher): the ranks finish the
    step, checkpoint, exit with REQUEUE_EXIT_CODE; the next start resumes from there."""
    import signal
    import time

    from r1mega.preemption import REQUEUE_EXIT_CODE

    save_dir, log = tmp_path / "ck", tmp_path / "train.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE"):
        env.pop(var, None)
    args = [sys.executable, "-m", "r1mega.cli", "train", "configs/tiny_cpu.yaml",
            "checkpoint.load=null", "train.steps=50", "rollout.max_new_tokens=8",
            "logging.wandb_mode=disabled",
            f"checkpoint.save_dir={save_dir}"]
    with open(log, "w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                start_new_session=True)
        deadline = time.time() + 300
        while "step 1/50" not in log.read_text() and time.time() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        proc.send_signal(signal.SIGUSR1)
        code = proc.wait(timeout=300)
    text = log.read_text()
    assert code == REQUEUE_EXIT_CODE, text[-3000:]
    assert "preemption signal: checkpointing after step" in text
    latest = find_latest_checkpoint(save_dir)
    assert latest is not None
    stopped_at = json.loads((latest / META).read_text())["step"]
    assert f"step {stopped_at + 1}/50" not in text

    resumed = _train(save_dir, "train.steps=" + str(stopped_at + 1), "logging.wandb_mode=disabled")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(step {stopped_at})" in resumed.stdout
    assert f"step {stopped_at + 1}/{stopped_at + 1}" in resumed.stdout
