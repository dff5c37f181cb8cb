#!/usr/bin/env python3
"""Rollout benchmarks: decode throughput and resharding, each against a baseline in the
same run.

1. **Decode throughput.** The rollout engine (KV cache, continuous batching, one process)
   against ``transformers``' ``generate`` on the same random model (converted with the
   project's converter), the same greedy batch and the same thread count: tokens/s of
   each and their ratio; the two must produce the same tokens.
2. **Resharding.** The project's plan (megatron-core's refit, with the project's fixes)
   against a naive all-gather-everything-then-slice baseline, on the same layouts and
   ranks: time of each (median), their ratio, and bytes received per rank against the
   minimum (the part of a rank's generation shard its training shard lacks).

    python bench/bench_rollout.py                 # default sizes, writes bench/results/
    python bench/bench_rollout.py --scale toy     # seconds; what the tests run

Prints a table and writes ``rollout.json``. Timings are this machine's: compare ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORKERS = ROOT / "bench" / "rollout_workers.py"

SCALES: dict[str, dict[str, Any]] = {
    "toy": {"hidden": 64, "layers": 2, "vocab": 256, "batch": 4, "prompt_len": 8,
            "new_tokens": 8, "repeats": 1, "reshard_layers": 2},
    "default": {"hidden": 256, "layers": 4, "vocab": 2048, "batch": 16, "prompt_len": 64,
                "new_tokens": 64, "repeats": 3, "reshard_layers": 8},
}


def decode_specs(scale: dict[str, Any]) -> list[dict[str, Any]]:
    h, layers, vocab = scale["hidden"], scale["layers"], scale["vocab"]
    common = {"batch": scale["batch"], "prompt_len": scale["prompt_len"],
              "new_tokens": scale["new_tokens"], "repeats": scale["repeats"]}
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
    return [{"model": "qwen2", "hf_config": qwen2, **common},
            {"model": "deepseek_v3", "hf_config": deepseek, **common}]


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
    repeats = scale["repeats"]
    return [
        (2, {"name": "dense", "model_config": dense, "repeats": repeats, "pairs": [
            {"train": [1, 2, 1], "generation": [2, 1]}]}),
        (2, {"name": "deepseek_v3", "model_config": moe, "repeats": repeats, "pairs": [
            {"train": [1, 2, 1], "generation": [2, 2]},
            {"train": [1, 1, 2], "generation": [2, 2]}]}),
    ]


def _torchrun(nproc: int, *args: str) -> None:
    from r1mega.launch import free_port

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(WORKERS),
           *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-6000:]}")


def run(scale_name: str, work: Path) -> dict[str, Any]:
    scale = SCALES[scale_name]
    results: dict[str, Any] = {"scale": scale_name, "decode": [], "reshard": []}
    for i, spec in enumerate(decode_specs(scale)):
        spec_file, out = work / f"decode{i}.json", work / f"decode{i}.out.json"
        spec_file.write_text(json.dumps(spec))
        _torchrun(1, "decode", str(spec_file), str(out))
        results["decode"].append(json.loads(out.read_text()))
    for i, (nproc, spec) in enumerate(reshard_specs(scale)):
        spec_file, out = work / f"reshard{i}.json", work / f"reshard{i}.out.json"
        spec_file.write_text(json.dumps(spec))
        _torchrun(nproc, "reshard", str(spec_file), str(out))
        results["reshard"].append(json.loads(out.read_text()))
    return results


def table(results: dict[str, Any]) -> str:
    lines = ["Decode (greedy, 1 process, 1 thread)",
             f"{'model':<12} {'params':>9} {'batch':>5} {'new':>4} {'engine tok/s':>13} "
             f"{'HF tok/s':>9} {'ratio':>6} {'same tokens':>11}"]
    for r in results["decode"]:
        lines.append(f"{r['model']:<12} {r['parameters'] / 1e6:>8.1f}M {r['batch']:>5} "
                     f"{r['new_tokens']:>4} {r['engine_tokens_per_s']:>13.1f} "
                     f"{r['transformers_tokens_per_s']:>9.1f} {r['ratio']:>6.2f} "
                     f"{'yes' if r['same_tokens'] else 'NO':>11}")
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
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        results = run(args.scale, Path(tmp))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
