"""The single-device benchmarks (training MFU, decode roofline) run at toy size on CPU and
write consistent JSON. No timing is asserted; the arithmetic around the timings is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from r1mega.config.schema import ModelConfig
from r1mega.perf.flops import forward_flops_per_token
from r1mega.perf.roofline import expected_experts_touched
from tests.distributed import ROOT

sys.path.insert(0, str(ROOT))
from bench.bench_models import TOY_DENSE, TOY_MOE  # noqa: E402


def _run(script: str, out: Path, *args: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, f"bench/{script}", "--scale", "toy", "--out",
                           str(out), *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    result["_stdout"] = proc.stdout
    return result


# Both benchmarks are checked at toy size on the CPU (what they report there: a CPU device,
# FP8 rows skipped for lack of a GPU); on a GPU machine they measure the GPU instead.
cpu_only = pytest.mark.skipif(torch.cuda.is_available(),
                              reason="checks the toy-size CPU run of the benchmarks")


def _environment_is_stated(result: dict[str, Any]) -> None:
    assert result["device"]["kind"] == "cpu"
    assert result["versions"]["megatron-core"] == "0.19.2"
    assert result["versions"]["torch"].startswith("2.14.1")
    assert result["date"]


@cpu_only
def test_training_bench(tmp_path: Path) -> None:
    result = _run("bench_training.py", tmp_path / "training.json")
    _environment_is_stated(result)
    assert "MFU" in result["_stdout"] and "skipped" in result["_stdout"]
    assert result["peak"]["dtype"] == "fp32" and result["peak"]["flops"] > 0
    assert "measured" in result["peak"]["source"]
    rows = {(r["model"], r["precision"]): r for r in result["rows"]}
    assert set(rows) == {("dense_toy", "fp32"), ("dense_toy", "fp8-blockwise"),
                         ("moe_toy", "fp32"), ("moe_toy", "fp8-blockwise")}
    for model, config in (("dense_toy", TOY_DENSE), ("moe_toy", TOY_MOE)):
        base = rows[(model, "fp32")]
        assert base["status"] == "ok", base
        flops = forward_flops_per_token(OmegaConf.structured(ModelConfig(**config)),
                                        base["seq_length"])
        assert base["training_flops_per_token"] == pytest.approx(flops.training)
        assert base["tokens_per_step"] == (base["seq_length"] * base["micro_batch_size"]
                                           * base["microbatches"])
        assert base["tokens_per_s"] == pytest.approx(base["tokens_per_step"]
                                                     / base["step_seconds"])
        assert base["mfu"] == pytest.approx(base["tokens_per_s"] * flops.training
                                            / result["peak"]["flops"])
        assert base["loss"] == base["loss"] and base["loss"] > 0  # finite
        assert base["parameters"] > 0
        skipped = rows[(model, "fp8-blockwise")]
        assert skipped["status"] == ("skipped: needs Transformer Engine on an FP8 GPU "
                                     "(no CUDA GPU here)")
        assert "precision.fp8=e4m3 needs Transformer Engine" in skipped["detail"]


@cpu_only
def test_decode_roofline_bench(tmp_path: Path) -> None:
    result = _run("bench_decode_roofline.py", tmp_path / "decode.json",
                  "--bandwidth-gbs", "10")
    _environment_is_stated(result)
    assert "roofline tok/s" in result["_stdout"]
    assert result["bandwidth"] == {"bytes_per_s": 10e9, "source": "--bandwidth-gbs 10.0"}
    models = {m["model"]: m for m in result["models"]}
    assert set(models) == {"dense_toy", "moe_toy"}
    assert models["dense_toy"]["routed_expert_bytes"] == 0
    assert models["moe_toy"]["routed_expert_bytes"] > 0
    for name, m in models.items():
        assert [r["batch"] for r in m["rows"]] == [1, 4]
        for r in m["rows"]:
            assert r["engine_steps"] == r["new_tokens"]  # one prefill step, then decodes
            assert r["decode_step_seconds"] > 0 and r["decode_tokens_per_s"] > 0
            context = r["prompt_len"] + r["new_tokens"] / 2
            assert r["kv_bytes_per_step"] == pytest.approx(
                r["batch"] * context * m["kv_bytes_per_token"])
            expected = m["dense_weight_bytes"] + r["batch"] * m["embedding_row_bytes"]
            if name == "moe_toy":
                touched = expected_experts_touched(TOY_MOE["num_experts"], TOY_MOE["moe_topk"],
                                                   r["batch"]) / TOY_MOE["num_experts"]
                expected += touched * m["routed_expert_bytes"]
            assert r["weight_bytes_per_step"] == pytest.approx(expected)
            step_bytes = r["weight_bytes_per_step"] + r["kv_bytes_per_step"]
            assert r["roofline_tokens_per_s"] == pytest.approx(r["batch"] * 10e9 / step_bytes)
            assert r["fraction_of_roofline"] == pytest.approx(
                r["decode_tokens_per_s"] / r["roofline_tokens_per_s"])
            assert r["reshard_seconds"] >= 0


@cpu_only
def test_rollout_gpu_check_skips_without_a_gpu(tmp_path: Path) -> None:
    """bench/gpu_check_rollout.py is ready for a GPU and exits cleanly without one."""
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "bench/gpu_check_rollout.py", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "skipped: no CUDA GPU" in proc.stdout
    assert json.loads(out.read_text()) == {"status": "skipped: no CUDA GPU"}
