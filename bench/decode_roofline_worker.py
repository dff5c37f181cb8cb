"""Worker of bench/bench_decode_roofline.py: ``python bench/decode_roofline_worker.py SPEC OUT``.

One process, one device. The policy is built (random weights) and handed to the
colocated rollout exactly as in training (resharding into the generation model, memory
handover, the engine). For each batch size the same greedy batch is generated twice, with
``new_tokens`` and with 1 new token; the difference is ``new_tokens - 1`` decode steps
without the prefill, so the decode step time excludes the prompt. Each is run once to
warm up, then ``repeats`` times; the best time counts. Bytes read per step are counted
from the generation model's own parameters and the engine's KV layout
(``r1mega.perf.roofline``, ``r1mega.rollout.kv_footprint``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from parallel.layout import Layout, init_distributed, initialize_layout
from parallel.platform import manual_seed
from r1mega.config.schema import R1MegaConfig
from r1mega.perf.roofline import (
    decode_step_bytes,
    kv_cache_bytes_per_token,
    model_weight_bytes,
    roofline_tokens_per_s,
)
from r1mega.rollout.colocated import ColocatedRollout
from r1mega.rollout.types import SamplingParams
from r1mega.training.policy import build_policy


def _best_generate_seconds(rollout: ColocatedRollout, prompts: list[list[int]],
                           new_tokens: int, repeats: int) -> tuple[float, dict[str, float]]:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    seeds = list(range(len(prompts)))
    best, metrics = float("inf"), {}
    for i in range(repeats + 1):  # the first run warms up
        samples = rollout.generate(prompts, params, seeds, [], None)
        if any(len(s.response_ids) != new_tokens for s in samples):
            raise RuntimeError("a response ended early; the benchmark needs fixed lengths")
        if i and rollout.metrics["time/generate"] < best:
            best, metrics = rollout.metrics["time/generate"], dict(rollout.metrics)
    return best, metrics


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    cfg = OmegaConf.merge(OmegaConf.structured(R1MegaConfig), {
        "model": spec["model_config"], "precision": {"params_dtype": spec["dtype"]},
        "rollout": {"max_batch_size": max(spec["batches"])}})
    initialize_layout(Layout.from_config(cfg.train_layout, 1))
    manual_seed(0)
    policy = build_policy(cfg.model, cfg.train_layout, cfg.precision)
    rollout = ColocatedRollout(cfg, policy, optimizer=None)
    model = rollout.model
    weights = model_weight_bytes(model, tied_embedding=cfg.model.tie_embeddings)
    kv_token = kv_cache_bytes_per_token(model)
    prompt_len, new = spec["prompt_len"], spec["new_tokens"]
    g = torch.Generator().manual_seed(1)
    rows = []
    for batch in spec["batches"]:
        prompts = torch.randint(3, cfg.model.vocab_size, (batch, prompt_len),
                                generator=g).tolist()
        full_s, metrics = _best_generate_seconds(rollout, prompts, new, spec["repeats"])
        prefill_s, _ = _best_generate_seconds(rollout, prompts, 1, spec["repeats"])
        step_s = (full_s - prefill_s) / (new - 1)
        # Decode step j (1..new-1) attends to prompt_len + j cached positions.
        step_bytes = decode_step_bytes(weights, cfg.model.num_experts, cfg.model.moe_topk,
                                       batch, kv_token, prompt_len + new / 2)
        roofline = roofline_tokens_per_s(batch, step_bytes.total, spec["bandwidth"])
        achieved = batch / step_s if step_s > 0 else float("nan")
        rows.append({
            "batch": batch, "prompt_len": prompt_len, "new_tokens": new,
            "generate_seconds": full_s, "prefill_seconds": prefill_s,
            "decode_step_seconds": step_s, "decode_tokens_per_s": achieved,
            "weight_bytes_per_step": step_bytes.weights,
            "kv_bytes_per_step": step_bytes.kv_cache,
            "roofline_step_seconds": step_bytes.total / spec["bandwidth"],
            "roofline_tokens_per_s": roofline, "fraction_of_roofline": achieved / roofline,
            "engine_steps": metrics.get("rollout/engine_steps"),
            "reshard_seconds": metrics.get("time/reshard"),
        })
    return {"model": spec["name"], "dtype": spec["dtype"],
            "parameters": sum(p.numel() for p in model.parameters()),
            "dense_weight_bytes": weights.dense, "embedding_row_bytes": weights.embedding_row,
            "routed_expert_bytes": sum(weights.experts.values()),
            "kv_bytes_per_token": kv_token, "rows": rows}


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    init_distributed()
    result = measure(spec)
    Path(out_path).write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
