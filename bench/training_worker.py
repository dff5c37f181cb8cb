"""Worker of bench/bench_training.py: ``python bench/training_worker.py SPEC OUT``.

One process, one device. For each precision row of the spec the policy is built with the
project's provider and optimizer (megatron-core DDP + Adam, fp32 master weights), then
full training steps (forward and backward over every microbatch, optimizer step) are
timed on random tokens with the next-token loss: the GEMMs an RL update runs, without
the sampling around it. FP8 rows the machine cannot run are reported as skipped with
the reason of the project's FP8 guard; a row that fails is reported with its error, and
the other rows still run.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from parallel.layout import Layout, destroy_layout, init_distributed, initialize_layout
from parallel.platform import gpu_available, manual_seed
from r1mega.config.schema import R1MegaConfig
from r1mega.models.fp8_support import Fp8Unavailable, check_fp8_supported
from r1mega.perf.flops import forward_flops_per_token, model_flops_utilization
from r1mega.training.batches import causal_lm_batch, data_parallel_microbatches
from r1mega.training.optim import build_optimizer
from r1mega.training.policy import build_policy
from r1mega.training.schedule import forward_backward, lm_loss


def precision_of(name: str, fp8_format: str) -> dict[str, Any]:
    """A row name (fp32 | bf16 | fp8-<recipe>) as a ``precision`` config section."""
    if name in ("fp32", "bf16"):
        return {"params_dtype": "float32" if name == "fp32" else "bfloat16", "fp8": None}
    if name.startswith("fp8-"):
        return {"params_dtype": "bfloat16", "fp8": fp8_format, "fp8_recipe": name[4:]}
    raise ValueError(f"unknown precision row {name!r}: fp32, bf16 or fp8-<recipe>")


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if gpu_available() \
        else torch.device("cpu")


def _sync() -> None:
    if gpu_available():
        torch.cuda.synchronize()


def _parameters(policy: Any) -> int:
    return sum(p.numel() for chunk in policy.unwrapped() for p in chunk.parameters())


def _timed_steps(policy: Any, optimizer: Any, microbatches: list[dict[str, torch.Tensor]],
                 warmup: int, steps: int) -> tuple[list[float], float]:
    """Seconds of each timed training step, and the last step's mean loss."""

    def step() -> float:
        policy.zero_grad()
        optimizer.zero_grad()
        stats = forward_backward(policy, microbatches, lm_loss)
        optimizer.step()
        total = torch.stack([s["lm_loss"] for s in stats]).sum(0).float()
        _sync()
        return float(total[0] / total[1])

    for _ in range(warmup):
        step()
    if gpu_available():
        torch.cuda.reset_peak_memory_stats()
    times, loss = [], float("nan")
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    return times, loss


def _release() -> None:
    """Drop the last row's model, optimizer and process groups before the next row."""
    destroy_layout()
    gc.collect()
    if gpu_available():
        torch.cuda.empty_cache()


def run_row(spec: dict[str, Any], name: str) -> dict[str, Any]:
    cfg = OmegaConf.merge(OmegaConf.structured(R1MegaConfig), {
        "model": spec["model_config"],
        "precision": precision_of(name, spec["fp8_format"]),
        "train": {"lr": 1e-5, "seq_length": spec["seq_length"],
                  "micro_batch_size": spec["micro_batch_size"],
                  "use_distributed_optimizer": False}})
    flops = forward_flops_per_token(cfg.model, spec["seq_length"])
    row: dict[str, Any] = {"model": spec["name"], "precision": name,
                           "training_flops_per_token": flops.training,
                           "flops_breakdown": flops.as_dict()}
    try:
        check_fp8_supported(cfg.precision, cfg.model.transformer_impl)
    except Fp8Unavailable as err:
        return {**row, "status": f"skipped: {err.reason}", "detail": str(err)}
    initialize_layout(Layout.from_config(cfg.train_layout, 1))
    manual_seed(0)
    policy = build_policy(cfg.model, cfg.train_layout, cfg.precision)
    optimizer = build_optimizer(policy, cfg.train, cfg.precision)
    mbs, seq, n_micro = spec["micro_batch_size"], spec["seq_length"], spec["microbatches"]
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.model.vocab_size, (mbs * n_micro, seq + 1), generator=g)
    device = _device()
    microbatches = [{k: v.to(device) for k, v in mb.items()}
                    for mb in data_parallel_microbatches(causal_lm_batch(tokens), mbs, 0, 1)]

    times, loss = _timed_steps(policy, optimizer, microbatches, spec["warmup_steps"],
                               spec["steps"])
    step_s = statistics.median(times)
    tokens_per_step = mbs * seq * n_micro
    tokens_per_s = tokens_per_step / step_s
    fp8 = bool(cfg.precision.fp8)
    peak = spec["peak_fp8_flops"] if fp8 else spec["peak_flops"]
    if fp8:
        row["mfu_vs_bf16_peak"] = model_flops_utilization(tokens_per_s, flops.training,
                                                          spec["peak_flops"])
    row.update(
        status="ok", parameters=_parameters(policy), seq_length=seq, micro_batch_size=mbs,
        microbatches=n_micro, tokens_per_step=tokens_per_step, step_seconds=step_s,
        step_seconds_all=times, tokens_per_s=tokens_per_s,
        achieved_tflops=tokens_per_s * flops.training / 1e12,
        peak_flops=peak,
        mfu=model_flops_utilization(tokens_per_s, flops.training, peak) if peak else None,
        loss=loss,
        max_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if gpu_available() else None,
    )
    return row


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    init_distributed()
    rows = []
    for name in spec["precisions"]:
        try:
            rows.append(run_row(spec, name))
        except Exception as err:  # noqa: BLE001 - one broken row must not lose the others
            traceback.print_exc()
            rows.append({"model": spec["name"], "precision": name,
                         "status": f"error: {type(err).__name__}: {err}"[:500]})
        _release()
    Path(out_path).write_text(json.dumps(rows))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
