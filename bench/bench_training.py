#!/usr/bin/env python3
"""Training-step throughput and MFU, bf16 against FP8, on one device.

For a dense model and a DeepSeek-V3-shaped MoE (MLA, routed + shared experts with
sigmoid routing, MTP), each precision row builds the policy with the project's provider
and optimizer and times full training steps (forward + backward over every microbatch +
Adam step) on random tokens. Reported per row: tokens/s, achieved model TFLOP/s and MFU.

Model FLOPs per token come from the config (``r1mega.perf.flops``: GEMMs of the
activated parameters only, attention scores with the sequence length, MTP; training = 3x
forward). MFU divides by the row's peak: the bf16 one for bf16 rows, the FP8 one for FP8
rows (which also report ``mfu_vs_bf16_peak``). Peaks are the datasheet's
(``r1mega.perf.devices``), ``--peak-tflops``, or on a CPU a measured fp32 GEMM rate.

    python bench/bench_training.py --scale gpu     # ~1.2B dense + ~1.9B-total MoE, H100
    python bench/bench_training.py --scale toy     # CPU, seconds; what the tests run

FP8 rows need Transformer Engine on an FP8 GPU; elsewhere they are reported as skipped,
with the guard's reason. Prints a table and writes ``training.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_common import environment, peak_flops, run_worker, write_results  # noqa: E402
from bench.bench_models import GPU_DENSE, GPU_MOE, TOY_DENSE, TOY_MOE  # noqa: E402

SCALES: dict[str, dict[str, Any]] = {
    "toy": {"models": {"dense_toy": TOY_DENSE, "moe_toy": TOY_MOE},
            "precisions": ["fp32", "fp8-blockwise"], "seq_length": 64,
            "micro_batch_size": 2, "microbatches": 2, "warmup_steps": 1, "steps": 3},
    "gpu": {"models": {"dense_1b": GPU_DENSE, "moe_v3_small": GPU_MOE},
            "precisions": ["bf16", "fp8-blockwise", "fp8-tensorwise", "fp8-delayed"],
            "seq_length": 4096, "micro_batch_size": 1, "microbatches": 4,
            "warmup_steps": 3, "steps": 10},
}


def run(scale_name: str, precisions: list[str] | None, fp8_format: str,
        peak_tflops: float | None, work: Path) -> dict[str, Any]:
    scale = SCALES[scale_name]
    peaks = peak_flops(peak_tflops)
    results: dict[str, Any] = {"benchmark": "training", "scale": scale_name, **environment(),
                               "peak": peaks, "rows": []}
    for name, model_config in scale["models"].items():
        spec = {"name": name, "model_config": model_config,
                "precisions": precisions or scale["precisions"], "fp8_format": fp8_format,
                "peak_flops": peaks["flops"], "peak_fp8_flops": peaks["fp8_flops"],
                **{k: scale[k] for k in ("seq_length", "micro_batch_size", "microbatches",
                                         "warmup_steps", "steps")}}
        results["rows"] += run_worker("training_worker.py", spec, work, name)
    return results


def _cell(value: float | None, fmt: str, scale: float = 1.0, suffix: str = "") -> str:
    return "-" if value is None else format(value * scale, fmt) + suffix


def table(results: dict[str, Any]) -> str:
    header = (f"{'model':<14} {'precision':<15} {'params':>8} {'tok/step':>8} {'step s':>8} "
              f"{'tok/s':>10} {'GFLOP/tok*':>10} {'TFLOP/s':>8} {'MFU':>6}  status")
    lines = [f"Training step on {results['device']['name']} ({results['scale']} scale); "
             f"peak: {results['peak']['source']}", header]
    for r in results["rows"]:
        lines.append(
            f"{r['model']:<14} {r['precision']:<15} "
            f"{_cell(r.get('parameters'), '.1f', 1e-6, 'M'):>8} "
            f"{_cell(r.get('tokens_per_step'), '.0f'):>8} "
            f"{_cell(r.get('step_seconds'), '.3f'):>8} "
            f"{_cell(r.get('tokens_per_s'), '.1f'):>10} "
            f"{_cell(r.get('training_flops_per_token'), '.4g', 1e-9):>10} "
            f"{_cell(r.get('achieved_tflops'), '.3f'):>8} "
            f"{_cell(r.get('mfu'), '.1f', 100, '%'):>6}  {r['status']}")
    lines.append("* training model FLOPs per token: 3 x forward (r1mega.perf.flops)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default=None,
                        help="default: gpu when CUDA is available, else toy")
    parser.add_argument("--precisions", default=None,
                        help="comma-separated rows: fp32, bf16, fp8-<recipe> "
                             "(recipes: delayed, tensorwise, blockwise, mxfp8)")
    parser.add_argument("--fp8-format", choices=("e4m3", "hybrid"), default="e4m3")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="bf16 dense peak of the device, overriding the datasheet table")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "training.json"))
    args = parser.parse_args(argv)
    if args.scale is None:
        import torch

        args.scale = "gpu" if torch.cuda.is_available() else "toy"
    precisions = args.precisions.split(",") if args.precisions else None
    with tempfile.TemporaryDirectory() as tmp:
        results = run(args.scale, precisions, args.fp8_format, args.peak_tflops, Path(tmp))
    write_results(results, Path(args.out), table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
