"""The command line as a user meets it: help, the tiny run, and refused layouts."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.distributed import ROOT


def r1mega(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "r1mega.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def test_help_lists_subcommands() -> None:
    out = r1mega("--help")
    assert out.returncode == 0
    for command in ("train", "plan", "convert", "generate", "eval"):
        assert re.search(rf"^\s+{command}\s", out.stdout, re.M), out.stdout


def test_tiny_cpu_run_prints_step_lines() -> None:
    """The README's run command: 2 processes, PP=2 tiny DeepSeek-V3, GRPO steps complete
    with rollouts, rewards and updates, one progress line per step."""
    out = r1mega("train", "configs/tiny_cpu.yaml", "train.steps=2", "rollout.max_new_tokens=8",
                 "checkpoint.save_dir=null")
    assert out.returncode == 0, out.stderr[-5000:]
    assert "train layout TP=1 PP=2" in out.stdout
    lines = [line for line in out.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == ["step 1/2", "step 2/2"], out.stdout
    for line in lines:
        fields = dict(part.split(" ", 1) for part in line.split(" | ")[1:-1])
        for key in ("reward", "acc", "format", "len", "kl", "entropy", "clip", "grad_norm",
                    "tok/s"):
            assert key in fields, line
        # Untrained on a 512-token vocabulary: near-uniform, entropy close to ln 512 = 6.24.
        assert 5.5 < float(fields["entropy"]) < 6.3, line
        assert 1 <= float(fields["len"]) <= 8, line
    assert "UserWarning" not in out.stderr


def _refused(out: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "invalid configuration" in out.stderr
    for needle in needles:
        assert needle in out.stderr, out.stderr
    assert "step 1" not in out.stdout  # nothing ran


def test_tp_not_dividing_heads_is_refused_by_name() -> None:
    _refused(r1mega("train", "configs/tiny_cpu.yaml", "train_layout.tp=3"),
             "train_layout.tp=3", "model.num_attention_heads=4")


def test_ep_not_dividing_experts_is_refused_by_name() -> None:
    _refused(r1mega("train", "configs/tiny_cpu.yaml", "generation_layout.ep=3"),
             "generation_layout.ep=3", "model.num_experts=4")


def test_world_size_not_a_layout_multiple_is_refused() -> None:
    _refused(r1mega("train", "configs/tiny_cpu.yaml", "--nproc", "3"),
             "train_layout", "3")


def test_unknown_key_suggests_the_right_one() -> None:
    _refused(r1mega("train", "configs/tiny_cpu.yaml", "grpo.klcoef=0.1"),
             "grpo.klcoef", "kl_coef")


def test_later_stages_say_not_implemented() -> None:
    out = r1mega("generate")
    assert out.returncode == 2 and "not implemented yet" in out.stdout


def test_bad_reward_parameter_is_refused_before_launch() -> None:
    _refused(r1mega("train", "configs/tiny_cpu.yaml",
                    "rewards.specs=[{name: format, params: {mdoe: strict}}]"),
             "rewards.specs[0].params.mdoe", "mode")
