#!/usr/bin/env python3
"""Decode throughput of the rollout engine against the memory-bandwidth roofline.

A decode step reads the weights the batch passes through and every row's KV cache; at
small batches that traffic, not arithmetic, bounds the step. The roofline is

    tokens/s <= batch * peak bandwidth / (weight bytes + KV-cache bytes read per step)

with the bytes counted from the generation model itself (``r1mega.perf.roofline``:
routed experts only as far as the batch is expected to touch them) and the bandwidth from
the datasheet table (``r1mega.perf.devices``, e.g. H100 SXM 3.35 TB/s, H200 4.8 TB/s),
``--bandwidth-gbs``, or on a CPU a measured copy bandwidth. The engine's decode step time
is measured without the prefill (see ``bench/decode_roofline_worker.py``), through the
colocated rollout as RL uses it, for a dense model and a DeepSeek-V3-shaped MoE.

    python bench/bench_decode_roofline.py --scale gpu    # ~1.2B dense + MoE, bf16, 1 GPU
    python bench/bench_decode_roofline.py --scale toy    # CPU, seconds; what the tests run

Resharding on its own (plan vs naive, bytes vs minimum, several ranks) is measured by
``bench/bench_rollout.py``; the ``reshard s`` column here is the single-device copy into
the generation model in the same run. Prints a table and writes ``decode_roofline.json``.
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

from bench.bench_common import environment, run_worker, write_results  # noqa: E402
from bench.bench_models import GPU_DENSE, GPU_MOE, TOY_DENSE, TOY_MOE  # noqa: E402

SCALES: dict[str, dict[str, Any]] = {
    "toy": {"models": {"dense_toy": TOY_DENSE, "moe_toy": TOY_MOE}, "dtype": "float32",
            "batches": [1, 4], "prompt_len": 16, "new_tokens": 16, "repeats": 2},
    "gpu": {"models": {"dense_1b": GPU_DENSE, "moe_v3_small": GPU_MOE}, "dtype": "bfloat16",
            "batches": [1, 8, 32, 128], "prompt_len": 512, "new_tokens": 128, "repeats": 3},
}


def bandwidth(bandwidth_gbs: float | None) -> dict[str, Any]:
    """Peak memory bandwidth in bytes/s and where the figure comes from."""
    import torch

    from r1mega.perf.devices import lookup_device, measure_copy_bandwidth

    if bandwidth_gbs is not None:
        return {"bytes_per_s": bandwidth_gbs * 1e9, "source": f"--bandwidth-gbs {bandwidth_gbs}"}
    if torch.cuda.is_available():
        spec = lookup_device(torch.cuda.get_device_name())
        if spec is not None:
            return {"bytes_per_s": spec.hbm_bytes_per_s, "source": f"datasheet {spec.name} HBM"}
        return {"bytes_per_s": measure_copy_bandwidth("cuda", megabytes=1024),
                "source": "measured device-to-device copy, 1 GiB (device not in the table)"}
    torch.set_num_threads(1)  # the workers run with OMP_NUM_THREADS=1
    return {"bytes_per_s": measure_copy_bandwidth("cpu", megabytes=64),
            "source": "measured 64 MiB memcpy on 1 CPU thread (read + write bytes)"}


def run(scale_name: str, bandwidth_gbs: float | None, work: Path) -> dict[str, Any]:
    scale = SCALES[scale_name]
    peak = bandwidth(bandwidth_gbs)
    results: dict[str, Any] = {"benchmark": "decode_roofline", "scale": scale_name,
                               **environment(), "bandwidth": peak, "models": []}
    for name, model_config in scale["models"].items():
        spec = {"name": name, "model_config": model_config, "bandwidth": peak["bytes_per_s"],
                **{k: scale[k] for k in ("dtype", "batches", "prompt_len", "new_tokens",
                                         "repeats")}}
        results["models"].append(run_worker("decode_roofline_worker.py", spec, work, name))
    return results


def table(results: dict[str, Any]) -> str:
    bw = results["bandwidth"]
    lines = [f"Decode on {results['device']['name']} ({results['scale']} scale); bandwidth "
             f"{bw['bytes_per_s'] / 1e9:.1f} GB/s ({bw['source']})",
             f"{'model':<14} {'dtype':<9} {'batch':>5} {'ctx':>5} {'step ms':>8} {'tok/s':>9} "
             f"{'MB/step':>8} {'roofline tok/s':>14} {'of roofline':>11} {'reshard s':>9}"]
    for m in results["models"]:
        for r in m["rows"]:
            mb = (r["weight_bytes_per_step"] + r["kv_bytes_per_step"]) / 1e6
            lines.append(
                f"{m['model']:<14} {m['dtype']:<9} {r['batch']:>5} "
                f"{r['prompt_len'] + r['new_tokens']:>5} {r['decode_step_seconds'] * 1e3:>8.2f} "
                f"{r['decode_tokens_per_s']:>9.1f} {mb:>8.2f} {r['roofline_tokens_per_s']:>14.1f} "
                f"{100 * r['fraction_of_roofline']:>10.1f}% {r['reshard_seconds']:>9.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default=None,
                        help="default: gpu when CUDA is available, else toy")
    parser.add_argument("--bandwidth-gbs", type=float, default=None,
                        help="peak memory bandwidth in GB/s, overriding the table/measurement")
    parser.add_argument("--out",
                        default=str(ROOT / "bench" / "results" / "decode_roofline.json"))
    args = parser.parse_args(argv)
    if args.scale is None:
        import torch

        args.scale = "gpu" if torch.cuda.is_available() else "toy"
    with tempfile.TemporaryDirectory() as tmp:
        results = run(args.scale, args.bandwidth_gbs, Path(tmp))
    write_results(results, Path(args.out), table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
