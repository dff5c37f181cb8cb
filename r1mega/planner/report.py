"""`r1mega plan`: print a :class:`~r1mega.planner.estimate.Plan` and refuse what won't fit.

Kept free of heavy imports at module level so the CLI's argument parser can use
:func:`add_plan_arguments` without importing torch.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

GIB = 1024**3


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """Cluster-shape options of `r1mega plan` (defaults: the config's ``slurm`` section)."""
    parser.add_argument("--nodes", type=int, default=None,
                        help="nodes (default: slurm.nodes of the config)")
    parser.add_argument("--gpus-per-node", type=int, default=None,
                        help="GPUs per node (default: slurm.gpus_per_node)")
    parser.add_argument("--gpu-mem-gib", type=float, default=None,
                        help="memory per GPU in GiB (default: slurm.gpu_mem_gib)")


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def _count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _seconds(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    if s >= 1:
        return f"{s:.1f} s"
    return f"{s * 1e3:.1f} ms"


def _checkpoint_bytes(cfg: Any, params: Any) -> float:
    """Bytes of a full training checkpoint: weights in params_dtype + optimizer state."""
    pbytes = 4 if cfg.precision.params_dtype == "float32" else 2
    optim = 8 + (4 if pbytes < 4 else 0)
    return params.total * (pbytes + optim)


def format_plan(plan: Any, cfg: Any, config_name: str) -> str:
    """The human-readable plan (both layouts, step time, assumptions)."""
    m, p, hw, asm = cfg.model, plan.params, plan.hardware, plan.assumptions
    tl, gl, t = plan.train_layout, plan.gen_layout, plan.time
    nodes = plan.world_size // plan.gpus_per_node
    lines = [
        f"r1mega plan: {config_name} on {nodes} node(s) x {plan.gpus_per_node} GPUs = "
        f"{plan.world_size} GPUs, {plan.gpu_mem_bytes / GIB:g} GiB each ({hw.name} figures)",
        "",
    ]
    n_moe = sum(1 for i in range(m.num_layers) if m.num_experts and i >= m.first_k_dense_layers)
    shape = f"{m.arch}, {m.num_layers} layers"
    if m.num_experts:
        shape += (f" ({m.num_layers - n_moe} dense + {n_moe} MoE, {m.num_experts} experts "
                  f"top-{m.moe_topk})")
    if m.mtp_num_layers:
        shape += f", {m.mtp_num_layers} MTP layer(s)"
    lines += [
        f"Model: {shape}, hidden {m.hidden_size}, vocab {m.vocab_size}",
        f"  parameters: {_count(p.main)} main + {_count(p.mtp)} MTP = {_count(p.total)} "
        f"trained (Hugging Face checkpoint: {_count(p.hf_total)}, MTP with its own "
        f"embedding/head copies); {_count(p.activated)} activated per token",
        f"  per layer: attention {_count(p.attention_per_layer)}, dense MLP "
        f"{_count(p.dense_mlp_per_layer)}"
        + (f", router {_count(p.router_per_layer)}, routed experts "
           f"{_count(p.routed_experts_per_layer)}, shared expert "
           f"{_count(p.shared_expert_per_layer)}" if m.num_experts else "")
        + f"; embedding {_count(p.embedding.total)}, output head {_count(p.output.total)}",
        "",
        f"Training layout: {tl.describe()}"
        + (f", expert-DP={tl.expert_dp}" if m.num_experts else "") + ", "
        f"SP={'on' if tl.sequence_parallel else 'off'}; {plan.updates_per_step} optimizer "
        f"update(s) per step, each {plan.microbatches} microbatch(es) of "
        f"{plan.tokens_per_microbatch} tokens per DP rank; recompute "
        f"{cfg.train.recompute or 'none'}; distributed optimizer "
        f"{'on' if cfg.train.use_distributed_optimizer else 'off'}",
        "  GiB per GPU:",
        "  stage  layers   params/GPU  weights  fp8    grads  optim  activ  logits  reserve  total",
    ]
    for s in plan.stages:
        layers = f"{s.layers.start}-{s.layers.stop - 1}" if len(s.layers) else "-"
        lines.append(
            f"  {s.stage:>5}  {layers:<7}  {_count(s.params):>10}  {_gib(s.weights):>7}  "
            f"{_gib(s.fp8_copies):>4}  {_gib(s.grads):>5}  {_gib(s.optimizer):>5}  "
            f"{_gib(s.activations):>5}  {_gib(s.logits):>6}  {_gib(s.reserve):>7}  "
            f"{_gib(s.total):>5}")
    worst = plan.worst_stage
    lines.append(f"  worst: stage {worst.stage}, {_gib(worst.total)} of "
                 f"{plan.gpu_mem_bytes / GIB:g} GiB ({worst.in_flight} microbatch(es) in flight)")
    g = plan.generation
    lines += [
        "",
        f"Generation layout: {gl.describe()}"
        + (f", expert-DP={gl.expert_dp}" if m.num_experts else "") + "; "
        f"{g.sequences_per_replica} sequence(s) x {cfg.train.seq_length} tokens decoded at "
        "once per replica "
        f"({g.decode_rounds} round(s) of rollout.max_batch_size)",
        f"  GiB per GPU: weights {_gib(g.weights)} ({_count(g.dense_params + g.expert_params)} "
        f"params), KV cache {_gib(g.kv_cache)} (the engine's paged buffer; "
        f"{g.kv_bytes_per_token / 1024:.1f} KiB per token over this GPU's layers), sampling "
        f"workspace {_gib(g.workspace)}, training "
        f"weights kept resident {_gib(g.train_weights)}, reserve {_gib(g.reserve)}: "
        f"total {_gib(g.total)}",
        f"  offloaded to host during the rollout: training grads + optimizer "
        f"{_gib(g.offloaded)} GiB per GPU",
        "",
        f"Resharding (training -> generation layout): <= {_gib(t.reshard_bytes)} GiB received "
        f"per GPU per step (its whole generation shard), {_seconds(t.reshard)} over IB",
        "",
        "Step time (upper bound: every response reaches rollout.max_new_tokens, "
        "communication not overlapped):",
        f"  rollout: prefill {_seconds(t.prefill)} + decode {_seconds(t.decode)} "
        f"({cfg.rollout.max_new_tokens} tokens x {_seconds(t.decode_per_token)}: HBM reads "
        f"of weights + KV cache at {asm.decode_hbm_efficiency:.0%} of "
        f"{hw.hbm_bytes_per_s / 1e12:g} TB/s, plus collective latencies)",
        f"  host offload of grads/optimizer, out and back: {_seconds(t.offload)}",
        f"  train: {t.train_flops / 1e15:,.0f} PFLOP at MFU "
        f"{asm.train_mfu(bool(cfg.precision.fp8)):.0%} of "
        f"{hw.peak_flops(bool(cfg.precision.fp8)) / 1e12:g} TFLOP/s "
        f"({'fp8' if cfg.precision.fp8 else 'bf16'}) = {_seconds(t.train_compute)}, x "
        f"{1 + t.bubble:.2f} pipeline bubble (PP-1)/microbatches, + communication "
        f"{_seconds(t.train_comm)} (EP all-to-all {_gib(t.ep_bytes)} GiB, DP "
        f"{_gib(t.dp_bytes)} GiB, TP {_gib(t.tp_bytes)} GiB per GPU)",
        f"  total ~{_seconds(t.total)} per step; {cfg.train.steps} steps ~"
        f"{_seconds(t.total * cfg.train.steps)}",
        "",
        f"Checkpoint: {_checkpoint_bytes(cfg, p) / 1024**4:.2f} TiB (weights + fp32 master "
        f"and Adam moments). A preemption warning (sbatch --signal=USR1@N) must cover the "
        f"rest of the step in flight (up to ~{_seconds(t.total)}) plus writing it.",
        "",
        f"Assumptions: {hw.name} bf16 {hw.bf16_flops / 1e12:g} / fp8 "
        f"{hw.fp8_flops / 1e12:g} TFLOP/s dense, HBM {hw.hbm_bytes_per_s / 1e12:g} TB/s, "
        f"NVLink {hw.nvlink_bytes_per_s / 1e9:g} GB/s per direction, IB "
        f"{hw.ib_bytes_per_s / 1e9:g} GB/s per GPU, PCIe {hw.pcie_bytes_per_s / 1e9:g} GB/s; "
        f"links at {asm.link_efficiency:.0%}; collective latency "
        f"{asm.nvlink_latency_s * 1e6:g} us (NVLink) / {asm.ib_latency_s * 1e6:g} us (IB); "
        f"prefill MFU {asm.prefill_mfu:.0%}; runtime reserve {asm.runtime_reserve_gib:g} GiB; "
        f"balanced expert routing. Formulas: r1mega/planner/estimate.py.",
    ]
    return "\n".join(lines)


def run_plan(args: argparse.Namespace) -> int:
    """Load the config for the requested cluster, print the plan; 1 when it won't fit."""
    from r1mega.config import load_config
    from r1mega.planner.estimate import make_plan

    probe = load_config(args.config, args.overrides)
    nodes = args.nodes or probe.slurm.nodes
    gpus = args.gpus_per_node or probe.slurm.gpus_per_node
    mem = args.gpu_mem_gib or probe.slurm.gpu_mem_gib
    world = nodes * gpus
    cfg = load_config(args.config, args.overrides, world_size=world)
    if cfg.rollout.length_schedule:
        from r1mega.training.length_schedule import (
            at_largest_response_budget,
            largest_response_budget,
        )

        largest = largest_response_budget(cfg)
        print(f"Planned at the largest response budget of rollout.length_schedule: "
              f"{largest.max_new_tokens} new tokens, train.seq_length {largest.seq_length}\n")
        cfg = at_largest_response_budget(cfg)
    plan = make_plan(cfg, world, gpus, mem)
    print(format_plan(plan, cfg, args.config))
    if plan.problems:
        print("\nr1mega plan: does not fit:", file=sys.stderr)
        for problem in plan.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print(f"\nfits: worst case {_gib(max(plan.worst_stage.total, plan.generation.total))} GiB "
          f"of {mem:g} GiB per GPU")
    return 0
