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
    assert "RL-shaped rollout" in proc.stdout and "naive ms" in proc.stdout
    result = json.loads(out.read_text())
    assert result["environment"]["versions"]["megatron-core"] == "0.19.2"
    assert {r["model"] for r in result["rl"]} == {"qwen2", "deepseek_v3"}
    for run in result["rl"]:
        assert set(run["systems"]) == {"engine", "engine_no_prefix_cache", "transformers"}
        for system in run["systems"].values():
            assert system["tokens_per_s"] > 0
            assert 1 <= system["length_range"][0] <= system["length_range"][1] <= run["max_new"]
        assert run["systems"]["transformers"]["vs_transformers"] == 1.0
    for row in result["prefix_sharing"]:
        # Deterministic counters, not timings: a group's prompt is prefilled once plus the
        # unshared tail per further sample.
        assert row["meets_target"], row
    latent = {r["shape"]: r for r in result["kv_bytes_per_token"]}
    assert latent["DeepSeek-V3 671B (128 heads)"]["latent_bytes"] == (512 + 64) * 61 * 2
    assert round(latent["DeepSeek-V3 671B (128 heads)"]["ratio"]) == 71
    for model in result["reshard"]:
        for pair in model["pairs"]:
            for rank in pair["per_rank"]:
                assert rank["plan_remote_bytes"] == rank["minimum_bytes"]
                # The baseline receives the whole model: never less than the plan.
                assert rank["naive_remote_bytes"] >= rank["plan_remote_bytes"]
            assert pair["plan_seconds"] > 0 and pair["naive_seconds"] > 0
