"""The benchmark scripts run and report consistent results (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.distributed import ROOT


def test_rollout_bench_runs_at_toy_size(tmp_path: Path) -> None:
    out = tmp_path / "rollout.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "bench/bench_rollout.py", "--scale", "toy",
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "engine tok/s" in proc.stdout and "naive ms" in proc.stdout
    result = json.loads(out.read_text())
    assert {r["model"] for r in result["decode"]} == {"qwen2", "deepseek_v3"}
    for run in result["decode"]:
        # The engine and transformers decode the same greedy tokens.
        assert run["same_tokens"], run
        assert run["engine_tokens_per_s"] > 0 and run["transformers_tokens_per_s"] > 0
    for model in result["reshard"]:
        for pair in model["pairs"]:
            for rank in pair["per_rank"]:
                assert rank["plan_remote_bytes"] == rank["minimum_bytes"]
                # The baseline receives the whole model: never less than the plan.
                assert rank["naive_remote_bytes"] >= rank["plan_remote_bytes"]
            assert pair["plan_seconds"] > 0 and pair["naive_seconds"] > 0
