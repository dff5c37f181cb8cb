"""The command line as a user meets it: help, the tiny run, and refused layouts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


WANDB_METRICS = (
    "train/loss", "train/kl", "train/entropy", "train/clip_frac", "train/grad_norm",
    "train/lr", "reward/mean", "reward/accuracy", "reward/format",
    "rollout/response_length", "rollout/response_length_hist", "rollout/samples",
    "perf/tokens_per_s", "perf/time_rollout_s", "perf/time_train_s", "memory/train_gib",
    "memory/rollout_gib", "perf/time_reshard_s", "perf/time_generate_s",
    "perf/reshard_remote_recv_bytes", "perf/reshard_minimum_recv_bytes",
    "rollout/decode_tokens_per_s", "memory/generation/kv_cache_gib",
    "memory/generation/grad_buffers_gib", "memory/train/generation_weights_gib",
)


def offline_run_history(wandb_dir: Path) -> list[dict]:
    """The history rows of an offline W&B run, read back with `wandb leet inspect`."""
    runs = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    assert runs, f"no offline W&B run under {wandb_dir}"
    cli = Path(sys.executable).parent / "wandb"
    out = subprocess.run([str(cli), "leet", "inspect", "--json", str(runs[-1])],
                         capture_output=True, text=True, timeout=120, check=True)
    return [record["history"]["item"] for record in map(json.loads, out.stdout.splitlines())
            if record.get("type") == "history"]


def offline_run_keys(wandb_dir: Path) -> set[str]:
    """Metric names logged to an offline W&B run."""
    keys: set[str] = set()
    for item in offline_run_history(wandb_dir):
        # Media are flattened ("rollout/samples._type", ...); metric names have no dot.
        keys.update(key.split(".")[0] for key in item)
    return keys


def eval_tables(wandb_dir: Path) -> list[list[dict]]:
    """The ``eval/samples`` tables of an offline W&B run in logging order, as row dicts
    (W&B writes each table as JSON under ``files/media/table/``)."""
    run = sorted((wandb_dir / "wandb").glob("offline-run-*"))[-1]
    files = (run / "files" / "media" / "table" / "eval").glob("samples_*.table.json")
    tables = []
    for path in sorted(files, key=lambda p: int(p.name.split("_")[1])):
        content = json.loads(path.read_text())
        tables.append([dict(zip(content["columns"], r, strict=True))
                       for r in content["data"]])
    return tables


def rescored_pass_at_1(table: list[dict]) -> float:
    """pass@1 of a full eval table, re-scored here with math-verify on the last
    ``<answer>`` block of every response (independent of the reward module): the mean
    over problems of the fraction of samples that are correct."""
    from math_verify import parse, verify

    per_problem: dict[int, list[float]] = {}
    for r in table:
        blocks = re.findall(r"<answer>(.*?)</answer>", r["response"], re.S)
        ok = bool(blocks) and bool(verify(parse(r["answer"]), parse(blocks[-1].strip())))
        assert float(ok) == r["correct"], r
        per_problem.setdefault(r["problem"], []).append(float(ok))
    return sum(sum(v) / len(v) for v in per_problem.values()) / len(per_problem)


def test_tiny_cpu_run_prints_step_lines_logs_wandb_and_evaluates(tmp_path: Path) -> None:
    """The tiny whole-pipeline job: 2 processes, PP=2 tiny DeepSeek-V3, GRPO steps
    complete with rollouts, rewards and updates, one progress line per step; the same
    metrics in an offline W&B run; then `r1mega eval` on the checkpoint it wrote."""
    # checkpoint.load=null: random weights (a warm-started base model learning is
    # tests/test_rl_learns.py's subject, on the README's config); the pipeline is the same.
    # Held-out evaluation at steps 0, 1 and 2 on 4 problems x k=2 (all 8 responses in
    # its table).
    out = r1mega("train", "configs/tiny_cpu.yaml", "checkpoint.load=null", "train.steps=2",
                 "rollout.max_new_tokens=8",
                 f"checkpoint.save_dir={tmp_path / 'ck'}", f"logging.wandb_dir={tmp_path}",
                 "logging.sample_table_interval=1", "eval.interval=1", "eval.k=2",
                 "eval.limit=4", "eval.max_new_tokens=6", "eval.table_rows=8")
    assert out.returncode == 0, out.stderr[-5000:]
    assert "train layout TP=1 PP=2" in out.stdout
    lines = [line for line in out.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == ["step 1/2", "step 2/2"], out.stdout
    for line in lines:
        fields = dict(part.split(" ", 1) for part in line.split(" | ")[1:-1])
        for key in ("reward", "acc", "format", "len", "kl", "entropy", "clip", "grad_norm",
                    "lr", "tok/s"):
            assert key in fields, line
        # Untrained on a 512-token vocabulary: near-uniform, entropy close to ln 512 = 6.24.
        assert 5.5 < float(fields["entropy"]) < 6.3, line
        assert 1 <= float(fields["len"]) <= 8, line
    assert "UserWarning" not in out.stderr
    evals = [line for line in out.stdout.splitlines() if line.startswith("eval step ")]
    assert [line.split(" | ")[0] for line in evals] == [
        "eval step 0/2", "eval step 1/2", "eval step 2/2"], out.stdout
    for line in evals:
        fields = dict(part.split(" ", 1) for part in line.split(" | ")[1:])
        assert 0.0 <= float(fields["pass@1"]) <= 1.0, line
        assert 1 <= float(fields["len"]) <= 6, line
        assert (fields["problems"], fields["k"], fields["T"], fields["top-p"]) == (
            "4", "2", "0.6", "0.95"), line

    missing = set(WANDB_METRICS) - offline_run_keys(tmp_path)
    assert not missing, missing
    history = offline_run_history(tmp_path)
    eval_rows = [row for row in history if "eval/pass_at_1" in row]
    assert [int(float(row["train/step"])) for row in eval_rows] == [0, 1, 2]
    for row, line in zip(eval_rows, evals, strict=True):
        assert f"pass@1 {float(row['eval/pass_at_1']):.4f}" in line
        assert float(row["eval/problems"]) == 4 and float(row["eval/k"]) == 2
        assert 1 <= float(row["eval/response_length"]) <= 6
        assert "eval/samples._type" in row
    # Each evaluation's table holds all 8 responses; pass@1 re-scored from them.
    for table, row in zip(eval_tables(tmp_path), eval_rows, strict=True):
        assert sorted((r["problem"], r["sample"]) for r in table) == [
            (p, s) for p in range(4) for s in range(2)]
        assert all(1 <= r["length"] <= 6 for r in table)
        assert rescored_pass_at_1(table) == pytest.approx(float(row["eval/pass_at_1"]), abs=1e-12)
    # Memory handover: gradients released while generating, generation weights while
    # training; the KV cache exists only during generation.
    for row in (row for row in history if "memory/train/grad_buffers_gib" in row):
        values = {k: float(v) for k, v in row.items() if k.startswith("memory/")}
        assert values["memory/generation/grad_buffers_gib"] == 0.0
        assert values["memory/train/grad_buffers_gib"] > 0.0
        assert values["memory/train/generation_weights_gib"] == 0.0
        assert values["memory/generation/generation_weights_gib"] > 0.0
        assert values["memory/generation/kv_cache_gib"] > 0.0
        assert values["memory/train/kv_cache_gib"] == 0.0

    result_file = tmp_path / "eval.json"
    ev = r1mega("eval", str(tmp_path / "ck"), "--limit", "4", "--k", "2",
                "--max-new-tokens", "4", "--output", str(result_file))
    assert ev.returncode == 0, ev.stderr[-4000:]
    assert "pass@1 (k=2" in ev.stdout and "greedy accuracy" in ev.stdout
    result = json.loads(result_file.read_text())
    assert result["problems"] == 4 and result["k"] == 2
    assert 0.0 <= result["pass_at_1"] <= 1.0 and 0.0 <= result["greedy_accuracy"] <= 1.0
    assert 1 <= result["mean_response_length"] <= 4

    completions = tmp_path / "completions.jsonl"
    gen = r1mega("generate", str(tmp_path / "ck"), "--prompt", "What is 1 + 2?", "--prompt",
                 "What is 3 * 4?", "--n", "2", "--max-new-tokens", "5", "--output",
                 str(completions))
    assert gen.returncode == 0, gen.stderr[-4000:]
    records = [json.loads(line) for line in completions.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["What is 1 + 2?"] * 2 + ["What is 3 * 4?"] * 2
    assert all(1 <= r["tokens"] <= 5 for r in records)
    assert gen.stdout.count("--- [") == 4


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


def test_generate_needs_prompts_and_a_checkpoint(tmp_path: Path) -> None:
    out = r1mega("generate", str(tmp_path))
    assert out.returncode == 2 and "--prompt" in out.stderr
    out = r1mega("generate", str(tmp_path), "--prompt", "hi")
    assert out.returncode == 2 and "holds no r1mega checkpoint" in out.stderr


def test_bad_reward_parameter_is_refused_before_launch() -> None:
    _refused(r1mega("train", "configs/tiny_cpu.yaml",
                    "rewards.specs=[{name: format, params: {mdoe: strict}}]"),
             "rewards.specs[0].params.mdoe", "mode")
