"""Mistakes that can be seen cheaply fail before any process starts, naming the key.

Each case was, before these checks, a failure 14-28 s into the run (after three minutes of
base-model pretraining with the default warm start) with a traceback from every rank, or
a run that silently truncated every response.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from r1mega.config import ConfigError, load_config
from r1mega.preflight import check_before_launch
from tests.distributed import ROOT

TINY = ROOT / "configs" / "tiny_cpu.yaml"


def _errors(command: str, *overrides: str, config: Path = TINY) -> str:
    cfg = load_config(str(config), list(overrides))
    with pytest.raises(ConfigError) as info:
        check_before_launch(cfg, command)
    return str(info.value)


def test_prompt_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.jsonl"
    assert f"data.train_path={missing}: prompt file not found" in _errors(
        "train", f"data.train_path={missing}")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "has no valid rows" in _errors("train", f"data.train_path={empty}")
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text('not json\n{"problem": 3, "answer": "1"}\n[1]\n')
    msg = _errors("train", f"data.train_path={malformed}")
    assert "invalid_json=1" in msg and "non_string_prompt=1" in msg and "(first: line 1" in msg
    no_answers = tmp_path / "no_answers.jsonl"
    no_answers.write_text(json.dumps({"problem": "1+1?"}) + "\n")
    assert "missing_answer=1" in _errors("train", f"data.train_path={no_answers}")
    parquet = tmp_path / "questions.parquet"
    pq.write_table(pa.table({"question": ["1+1?"], "answer": ["2"]}), parquet)
    msg = _errors("train", f"data.train_path={parquet}")
    assert "has no column 'problem' for the prompt (columns: question, answer)" in msg
    # The right field names make the same files pass.
    cfg = load_config(str(TINY), [f"data.train_path={parquet}", "data.prompt_field=question"])
    check_before_launch(cfg, "train")


def test_every_job_checks_the_files_it_reads(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.jsonl"
    msg = _errors("sample", f"sample.prompts_path={missing}")
    assert f"sample.prompts_path={missing}" in msg
    msg = _errors("sft", f"sft.train_path={missing}",
                  config=ROOT / "configs" / "sft_tiny_cpu.yaml")
    assert f"sft.train_path={missing}" in msg
    sources = (f"data.sources=[{{name: math, path: builtin:add_small}}, "
               f"{{name: chat, path: {missing}, reward: reward_model}}]")
    assert f"data.sources[1].path={missing}" in _errors(
        "train", sources, f"rewards.reward_model.load={tmp_path}")


def test_vocabulary_and_rollout_budget() -> None:
    msg = _errors("train", "model.vocab_size=200")
    assert "model.vocab_size=200 is smaller than the tokenizer's 259 tokens" in msg
    # tiny_cpu: 432-token templated prompts + 48 new tokens fill seq_length 480 (+1).
    check_before_launch(load_config(str(TINY)), "train")
    msg = _errors("train", "rollout.max_new_tokens=50")
    assert "rollout.max_new_tokens=50 plus the longest prompt (432 tokens" in msg
    assert "train.seq_length=480" in msg
    # Several problems at once.
    assert _errors("train", "model.vocab_size=200", "rollout.max_new_tokens=600").count(
        "\n") == 1


def test_cli_fails_before_launch_and_before_pretraining(tmp_path: Path) -> None:
    """The default warm start would pretrain the base model first (three minutes)."""
    base = tmp_path / "base"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, "-m", "r1mega.cli", "train", str(TINY),
         f"data.train_path={tmp_path / 'missing.jsonl'}", f"checkpoint.load=warm_start:{base}",
         f"checkpoint.save_dir={tmp_path / 'ck'}"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        "r1mega: invalid configuration:",
        f"data.train_path={tmp_path / 'missing.jsonl'}: prompt file not found: "
        f"{tmp_path / 'missing.jsonl'}"]
    assert not base.exists() and not (tmp_path / "ck").exists()


@pytest.mark.parametrize("name,command", [("tiny_cpu", "train"), ("r1_zero_tiny_cpu", "train"),
                                          ("r1_stage2_tiny_cpu", "train"),
                                          ("sample_tiny_cpu", "sample"), ("sft_tiny_cpu", "sft")])
def test_shipped_configs_pass_their_own_checks(name: str, command: str) -> None:
    """A shipped config whose own data does not fit its budget fails here, not in a user's
    first launch (distill and hf_tiny_cpu read files an earlier job writes: their walk in
    tests/test_pipeline_walk.py and tests/test_hf_user_path.py launches them)."""
    check_before_launch(load_config(ROOT / "configs" / f"{name}.yaml", world_size=2), command)
