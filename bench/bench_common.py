"""What the single-device benchmarks share: the device and its peaks, versions, workers.

Every result file says which device it was measured on, against which peak (datasheet
or measured, and which), and with which software versions, so numbers from different
machines are never compared blindly.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Device, software versions and the date of a benchmark run."""
    import torch

    if torch.cuda.is_available():
        device = {"kind": "cuda", "name": torch.cuda.get_device_name(),
                  "compute_capability": list(torch.cuda.get_device_capability()),
                  "cuda": torch.version.cuda}
    else:
        device = {"kind": "cpu", "name": f"CPU ({os.cpu_count()} cores visible, "
                  f"{os.environ.get('OMP_NUM_THREADS', 'default')} OMP threads)"}
    return {"device": device,
            "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                         "megatron-core": _version("megatron-core"),
                         "transformer-engine": _version("transformer-engine")},
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def peak_flops(peak_tflops: float | None) -> dict[str, Any]:
    """Peak FLOP/s of this device for its training dtype (``dtype``: bf16 on GPUs, fp32
    on CPUs) and for FP8 (None without FP8 tensor cores): the command line's, the
    datasheet's, or (CPU, unknown GPU) a measured GEMM rate; ``source`` says which."""
    import torch

    from r1mega.perf.devices import lookup_device, measure_matmul_flops

    if torch.cuda.is_available():
        if peak_tflops is not None:
            return {"dtype": "bf16", "flops": peak_tflops * 1e12,
                    "fp8_flops": 2 * peak_tflops * 1e12,
                    "source": f"--peak-tflops {peak_tflops} (fp8: twice that)"}
        spec = lookup_device(torch.cuda.get_device_name())
        if spec is not None:
            return {"dtype": "bf16", "flops": spec.peak_flops(False),
                    "fp8_flops": spec.peak_flops(True) if spec.fp8_tflops else None,
                    "source": f"datasheet {spec.name}, dense"}
        measured = measure_matmul_flops("cuda", torch.bfloat16, size=8192)
        return {"dtype": "bf16", "flops": measured, "fp8_flops": None,
                "source": "measured bf16 8192^3 GEMM (device not in r1mega.perf.devices)"}
    if peak_tflops is not None:
        return {"dtype": "fp32", "flops": peak_tflops * 1e12, "fp8_flops": None,
                "source": f"--peak-tflops {peak_tflops}"}
    torch.set_num_threads(1)  # the workers run with OMP_NUM_THREADS=1
    measured = measure_matmul_flops("cpu", torch.float32, size=1024)
    return {"dtype": "fp32", "flops": measured, "fp8_flops": None,
            "source": "measured fp32 1024^3 GEMM on 1 CPU thread (no datasheet peak)"}


def run_worker(script: str, spec: dict[str, Any], work: Path, tag: str) -> Any:
    """Run ``bench/<script> SPEC OUT`` as one fresh process; return its JSON output."""
    spec_file, out = work / f"{tag}.json", work / f"{tag}.out.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    env.pop("RANK", None)  # a lone process: the worker rendezvous with itself
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), str(spec_file),
                           str(out)], capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"bench/{script} ({tag}) failed:\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


def write_results(results: dict[str, Any], out: Path,
                  table: Callable[[dict[str, Any]], str]) -> None:
    """Write the JSON first (a table bug must not lose a GPU run), then print the table."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"\nwritten: {out}")
