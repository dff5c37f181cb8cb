#!/usr/bin/env python3
"""Rollout benchmarks, each against baselines in the same run.

1. **RL-shaped rollout.** ``prompts`` prompts x ``group`` (16) samples each, temperature 1,
   responses ending at EOS after a spread of lengths (the random model's EOS is made
   likely enough: ~``mean_length`` tokens on average, roughly geometric, capped at
   ``max_new``), on a tiny dense (Qwen2-shaped) and a tiny DeepSeek-V3-shaped model
   converted with the project's converter. Systems: the rollout engine (megatron-core's
   dynamic engine: continuous batching, prefix sharing over each group, MLA latent
   cache), the same with prefix caching off, ``transformers``' ``generate`` in padded
   batches of the engine's ``max_batch_size``, and (``--old-engine-checkout DIR``, a
   checkout of a commit before it was retired) the previous static-KV-cache engine. The
   systems take turns round by round (``rounds``) in one process, so a shared machine's
   load hits them alike; tokens/s = generated tokens (to EOS) / wall time, median over
   the rounds, and ratios against ``transformers``.
2. **Prefix sharing.** Prompt tokens the engine prefilled per group, with and without
   prefix caching (target: at most 1/group of the unshared cost plus one KV block per
   sample, i.e. a fraction of ``1/group + block/prompt_len``).
3. **KV bytes per token** of DeepSeek-V3 shapes: the MLA latent the engine caches
   against per-head keys and values (computed by :mod:`r1mega.rollout.kv_footprint`, the
   rule the engine sizes its buffer with and the tests check against megatron's context).
4. **Resharding.** The project's plan (megatron-core's refit, with the project's fixes)
   against a naive all-gather-everything-then-slice baseline, on the same layouts and
   ranks: time of each (median), their ratio, and bytes received per rank against the
   minimum (the part of a rank's generation shard its training shard lacks).

    python bench/bench_rollout.py                 # default sizes, writes bench/results/
    python bench/bench_rollout.py --scale toy     # seconds; what the tests run
    git worktree add /tmp/old 23f24bc && \
        python bench/bench_rollout.py --old-engine-checkout /tmp/old

Prints a table and writes ``rollout.json``. Timings are this machine's: compare ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORKERS = ROOT / "bench" / "rollout_workers.py"

SCALES: dict[str, dict[str, Any]] = {
    "toy": {"hidden": 64, "layers": 2, "vocab": 256, "prompts": 2, "group": 4,
            "prompt_len": 20, "max_new": 24, "mean_length": 8, "max_batch_size": 8,
            "rounds": 1, "repeats": 1, "reshard_layers": 2, "reshard_repeats": 1},
    "default": {"hidden": 256, "layers": 4, "vocab": 2048, "prompts": 4, "group": 16,
                "prompt_len": 96, "max_new": 256, "mean_length": 64, "max_batch_size": 64,
                "rounds": 3, "repeats": 1, "reshard_layers": 8, "reshard_repeats": 3},
}
EOS_ID = 2
SYSTEMS = ("engine", "engine_no_prefix_cache", "transformers")


def model_specs(scale: dict[str, Any]) -> list[dict[str, Any]]:
    h, layers, vocab = scale["hidden"], scale["layers"], scale["vocab"]
    qwen2 = {"vocab_size": vocab, "hidden_size": h, "intermediate_size": 4 * h,
             "num_hidden_layers": layers, "num_attention_heads": max(4, h // 32),
             "num_key_value_heads": 2, "max_position_embeddings": 1024,
             "tie_word_embeddings": False}
    deepseek = {"vocab_size": vocab, "hidden_size": h, "intermediate_size": 2 * h,
                "moe_intermediate_size": h // 2, "num_hidden_layers": layers,
                "num_attention_heads": max(4, h // 32), "num_key_value_heads": max(4, h // 32),
                "n_shared_experts": 1, "n_routed_experts": 8, "num_experts_per_tok": 2,
                "n_group": 1, "topk_group": 1, "routed_scaling_factor": 2.5,
                "first_k_dense_replace": 1, "q_lora_rank": h // 2, "kv_lora_rank": h // 4,
                "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
                "rope_interleave": True, "num_nextn_predict_layers": 0,
                "max_position_embeddings": 1024}
    return [{"model": "qwen2", "hf_config": qwen2, "block": 16},
            {"model": "deepseek_v3", "hf_config": deepseek, "block": 64}]


def rl_spec(scale: dict[str, Any], model: dict[str, Any], systems: list[str],
            seed: int) -> dict[str, Any]:
    return {"model": model["model"], "hf_config": model["hf_config"], "systems": systems,
            "eos_id": EOS_ID, "seed": seed, "repeats": scale["rounds"],
            "rollout": {"kv_block_tokens": model["block"]},
            **{k: scale[k] for k in ("prompts", "group", "prompt_len", "max_new",
                                     "mean_length", "max_batch_size")}}


def reshard_specs(scale: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    h, layers = scale["hidden"], scale["reshard_layers"]
    dense = {"arch": "qwen2", "num_layers": layers, "hidden_size": h, "ffn_hidden_size": 4 * h,
             "num_attention_heads": 8, "num_query_groups": 4, "vocab_size": scale["vocab"],
             "qkv_bias": True, "transformer_impl": "local"}
    moe = {"arch": "deepseek_v3", "num_layers": layers, "hidden_size": h,
           "ffn_hidden_size": 2 * h, "num_attention_heads": 8, "vocab_size": scale["vocab"],
           "q_lora_rank": h // 2, "kv_lora_rank": h // 4, "qk_head_dim": 32,
           "qk_pos_emb_head_dim": 16, "v_head_dim": 32, "num_experts": 8,
           "moe_ffn_hidden_size": h // 2, "moe_topk": 2,
           "moe_shared_expert_intermediate_size": h // 2, "first_k_dense_layers": 1,
           "transformer_impl": "local"}
    repeats = scale["reshard_repeats"]
    return [
        (2, {"name": "dense", "model_config": dense, "repeats": repeats, "pairs": [
            {"train": [1, 2, 1], "generation": [2, 1]}]}),
        (2, {"name": "deepseek_v3", "model_config": moe, "repeats": repeats, "pairs": [
            {"train": [1, 2, 1], "generation": [2, 2]},
            {"train": [1, 1, 2], "generation": [2, 2]}]}),
    ]


def _torchrun(nproc: int, *args: str, pythonpath: str = str(ROOT)) -> None:
    from r1mega.launch import free_port

    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore", "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(WORKERS),
           *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-6000:]}")


def _load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_rl(scale: dict[str, Any], work: Path, old_checkout: Path | None) -> list[dict]:
    """Every system on every model: one process takes turns between the engine (with and
    without prefix caching) and transformers; the retired engine, from an old checkout,
    runs in a process of its own on the same weights and workload."""
    results = []
    for m, model in enumerate(model_specs(scale)):
        spec_file, out = work / f"rl{m}.json", work / f"rl{m}.out.json"
        spec_file.write_text(json.dumps(rl_spec(scale, model, list(SYSTEMS), seed=1)))
        _torchrun(1, "rl", str(spec_file), str(out))
        result = json.loads(out.read_text())
        runs = result["runs"]
        hf_baselines = {system: "transformers" for system in runs}
        if old_checkout is not None:
            # Its own process, taking turns with transformers there: its ratio is against
            # the transformers runs of that process.
            spec = rl_spec(scale, model, ["old_engine", "transformers"], seed=1)
            spec.pop("rollout")  # the old engine's config has none of the new keys
            spec_file.write_text(json.dumps(spec))
            _torchrun(1, "rl", str(spec_file), str(out),
                      pythonpath=f"{old_checkout}{os.pathsep}{ROOT}")
            old = json.loads(out.read_text())["runs"]
            runs["old_engine"] = old["old_engine"]
            runs["transformers_beside_old_engine"] = old["transformers"]
            hf_baselines["old_engine"] = "transformers_beside_old_engine"
        summary = {"model": model["model"], "parameters": result["parameters"],
                   "sequences": scale["prompts"] * scale["group"], "group": scale["group"],
                   "prompt_len": scale["prompt_len"], "max_new": scale["max_new"],
                   "block": model["block"], "systems": {}}
        for system, timed in runs.items():
            lengths = [n for run in timed for n in run["lengths"]]
            summary["systems"][system] = {
                "tokens_per_s": statistics.median(run["tokens_per_s"] for run in timed),
                "all_tokens_per_s": [run["tokens_per_s"] for run in timed],
                "mean_length": sum(lengths) / len(lengths),
                "length_range": [min(lengths), max(lengths)],
                "eos_frac": sum(n < scale["max_new"] for n in lengths) / len(lengths),
                **{k: timed[-1][k] for k in ("prefill_tokens_computed",
                                             "prefill_tokens_skipped", "kv_bytes_per_token")
                   if k in timed[-1]},
            }
        for system, entry in summary["systems"].items():
            baseline = summary["systems"][hf_baselines.get(system, system)]
            entry["vs_transformers"] = entry["tokens_per_s"] / baseline["tokens_per_s"]
        results.append(summary)
    return results


def prefix_sharing(rl: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Prompt tokens prefilled per group with and without prefix caching."""
    rows = []
    for r in rl:
        groups = r["sequences"] // r["group"]
        shared = r["systems"]["engine"]["prefill_tokens_computed"] / groups
        unshared = r["systems"]["engine_no_prefix_cache"]["prefill_tokens_computed"] / groups
        # The target: a group's prefill costs at most 1/group of the unshared one
        # plus one block per sample.
        target = 1 / r["group"] + r["block"] / r["prompt_len"]
        rows.append({"model": r["model"], "group": r["group"], "block": r["block"],
                     "prefilled_per_group_shared": shared,
                     "prefilled_per_group_unshared": unshared, "fraction": shared / unshared,
                     "target_fraction": target, "meets_target": shared / unshared <= target})
    return rows


def kv_bytes_per_token_table() -> list[dict[str, Any]]:
    """DeepSeek-V3's KV bytes per token (bf16, all 61 layers, one GPU at TP=1)."""
    from r1mega.rollout.kv_footprint import kv_bytes_per_token

    shapes = [("DeepSeek-V3 671B (128 heads)", 61, 128), ("DeepSeek-V3 shape, 16 heads", 61, 16)]
    rows = []
    for name, layers, heads in shapes:
        latent = kv_bytes_per_token(layers=layers, dtype_bytes=2, tp=1, mla=True,
                                    kv_lora_rank=512, rope_dim=64)
        # Per-head keys (128 nope + 64 rope) and values (128) per head, as megatron-core's
        # static path cached them.
        per_head = 2 * layers * heads * (192 + 128)
        rows.append({"shape": name, "latent_bytes": latent, "per_head_bytes": per_head,
                     "ratio": per_head / latent,
                     "formula": "(kv_lora_rank + qk_rope_head_dim) x layers x bytes"})
    return rows


def run(scale_name: str, work: Path, old_checkout: Path | None = None) -> dict[str, Any]:
    from bench.bench_common import environment

    scale = SCALES[scale_name]
    results: dict[str, Any] = {"scale": scale_name, "environment": environment(),
                               "load_average_before": _load_average()}
    results["rl"] = run_rl(scale, work, old_checkout)
    results["prefix_sharing"] = prefix_sharing(results["rl"])
    results["kv_bytes_per_token"] = kv_bytes_per_token_table()
    results["reshard"] = []
    for i, (nproc, spec) in enumerate(reshard_specs(scale)):
        spec_file, out = work / f"reshard{i}.json", work / f"reshard{i}.out.json"
        spec_file.write_text(json.dumps(spec))
        _torchrun(nproc, "reshard", str(spec_file), str(out))
        results["reshard"].append(json.loads(out.read_text()))
    results["load_average_after"] = _load_average()
    return results


def table(results: dict[str, Any]) -> str:
    lines = ["RL-shaped rollout (1 process, 1 thread; temperature 1, EOS-terminated; "
             "median tok/s over interleaved runs)",
             f"{'model':<12} {'params':>7} {'system':<31} {'tok/s':>8} {'vs HF':>6} "
             f"{'mean len':>8} {'range':>9} {'EOS':>5}"]
    for r in results["rl"]:
        for system, s in r["systems"].items():
            lo, hi = s["length_range"]
            lines.append(f"{r['model']:<12} {r['parameters'] / 1e6:>6.1f}M {system:<31} "
                         f"{s['tokens_per_s']:>8.1f} {s['vs_transformers']:>6.2f} "
                         f"{s['mean_length']:>8.1f} {f'{lo}-{hi}':>9} {s['eos_frac']:>5.0%}")
    lines += ["", "Prefix sharing (prompt tokens prefilled per group)",
              f"{'model':<12} {'group':>5} {'block':>5} {'shared':>7} {'unshared':>8} "
              f"{'fraction':>8} {'target':>7}"]
    for r in results["prefix_sharing"]:
        lines.append(f"{r['model']:<12} {r['group']:>5} {r['block']:>5} "
                     f"{r['prefilled_per_group_shared']:>7.0f} "
                     f"{r['prefilled_per_group_unshared']:>8.0f} {r['fraction']:>8.3f} "
                     f"{r['target_fraction']:>7.3f}")
    lines += ["", "KV bytes per token (bf16, all layers)",
              f"{'shape':<30} {'latent':>8} {'per-head':>10} {'ratio':>6}"]
    for r in results["kv_bytes_per_token"]:
        lines.append(f"{r['shape']:<30} {r['latent_bytes']:>8,} {r['per_head_bytes']:>10,} "
                     f"{r['ratio']:>6.1f}")
    lines += ["", "Resharding (per step; bytes received by the busiest rank)",
              f"{'model':<12} {'train -> generation':<26} {'plan ms':>8} {'naive ms':>9} "
              f"{'speedup':>7} {'plan MB':>8} {'min MB':>7} {'naive MB':>9}"]
    for r in results["reshard"]:
        for pair in r["pairs"]:
            worst = max(pair["per_rank"], key=lambda x: x["plan_remote_bytes"])
            naive = max(x["naive_remote_bytes"] for x in pair["per_rank"])
            lines.append(
                f"{r['model']:<12} {pair['train'] + ' -> ' + pair['generation']:<26} "
                f"{pair['plan_seconds'] * 1e3:>8.1f} {pair['naive_seconds'] * 1e3:>9.1f} "
                f"{pair['speedup']:>7.2f} {worst['plan_remote_bytes'] / 1e6:>8.2f} "
                f"{worst['minimum_bytes'] / 1e6:>7.2f} {naive / 1e6:>9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="default")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "rollout.json"))
    parser.add_argument("--old-engine-checkout", type=Path, default=None,
                        help="a checkout of a commit with the previous (static KV cache) "
                             "engine, benchmarked as a further system")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        results = run(args.scale, Path(tmp), args.old_engine_checkout)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
