"""Tests that check what a machine without a GPU (or Transformer Engine) reports skip on a
GPU machine instead of failing there: run with CUDA reported available, they are skipped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.distributed import ROOT

CPU_ONLY_TESTS = [
    "tests/test_precision.py::test_this_cpu_machine_refuses_fp8_with_the_clear_error",
    "tests/test_bench_gpu_scripts.py::test_training_bench",
    "tests/test_bench_gpu_scripts.py::test_decode_roofline_bench",
    "tests/test_bench_gpu_scripts.py::test_rollout_gpu_check_skips_without_a_gpu",
]


def test_cpu_only_checks_skip_where_a_gpu_is_present(tmp_path: Path) -> None:
    plugin = tmp_path / "pretend_gpu.py"
    plugin.write_text("import torch\ntorch.cuda.is_available = lambda: True\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "pretend_gpu",
                           "-p", "no:cacheprovider", *CPU_ONLY_TESTS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"{len(CPU_ONLY_TESTS)} skipped" in proc.stdout, proc.stdout[-3000:]
