#!/usr/bin/env python3
"""GPU check of the rollout engine: run it on one H100 or H200 whenever one is at hand.

CI and the development machines have no GPU, so everything below is what only a GPU can
show. The engine runs as on a cluster: Transformer Engine layer specs (when TE imports),
flash-attention / FlashMLA kernels, CUDA graphs (``rollout.cuda_graphs``), bf16, on a
~1.2B dense model and a DeepSeek-V3-shaped MoE (``bench/bench_models.py``). Checks:

1. **Greedy tokens.** Every token the engine picks greedily is the argmax of the same
   model's full recompute (the training-layout policy re-reads prompt + response without a
   KV cache) up to bf16 ties: its recomputed log-probability is within ``--tie-tolerance``
   of the best one. The engine's log-probabilities against the recompute are reported.
2. **Kernels vs the CPU adaptation.** megatron's paged flash-attention path (prefill and
   decode; FlashMLA's absorbed decode for MLA) against ``parallel.platform.paged_attention``
   (the torch implementation CPU runs use) on identical paged inputs, bf16 tolerance.
3. **Refit, reset, suspend/resume under CUDA graphs.** The policy's weights change, the
   rollout reshards and generates again (the engine resets its prefix cache and resumes its
   KV memory, CUDA graphs re-captured): check 1 again with the new weights, and the KV
   memory is released between calls.
4. **Decode throughput against the HBM roofline**, as ``bench/bench_decode_roofline.py``
   measures it (decode steps without the prefill, bytes from the generation model).

    python bench/gpu_check_rollout.py            # writes bench/results/gpu_check_rollout.json

Without a CUDA GPU it prints ``skipped`` and exits 0. Exit status 1 when a check fails.
Record the table with the device, date and versions (in the JSON) in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "bench" / "results" / "gpu_check_rollout.json"


def _prompts(vocab: int, count: int, length: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (count, length), generator=g).tolist()


def _teacher_forced(policy: Any, prompt: list[int], response: list[int]) -> Any:
    """Full-vocabulary log-probabilities of each response position, no KV cache."""
    import torch

    from r1mega.training.schedule import forward_backward

    ids = prompt + response
    batch = {"tokens": torch.tensor([ids[:-1]]), "position_ids": torch.arange(len(ids) - 1)[None]}
    holder: dict[str, Any] = {}

    def keep(batch: dict[str, Any], output: Any) -> Any:
        holder["logits"] = output.float()
        return output.sum() * 0.0, torch.tensor(1, dtype=torch.int), {}

    with torch.no_grad():
        forward_backward(policy, [batch], keep, forward_only=True,
                         model_forward=lambda m, b: m(input_ids=b["tokens"],
                                                      position_ids=b["position_ids"],
                                                      attention_mask=None))
    logp = torch.log_softmax(holder["logits"][0], dim=-1)
    return logp[len(prompt) - 1:len(ids) - 1]


def greedy_check(rollout: Any, policy: Any, prompts: list[list[int]], new_tokens: int,
                 tie_tolerance: float) -> dict[str, Any]:
    """Check 1 on ``prompts``."""
    import torch

    from r1mega.rollout.types import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    samples = rollout.generate(prompts, params, list(range(len(prompts))), [], None)
    worst_margin, worst_logprob = 0.0, 0.0
    for prompt, sample in zip(prompts, samples, strict=True):
        logp = _teacher_forced(policy, prompt, sample.response_ids)
        chosen = logp.gather(-1, torch.tensor(sample.response_ids, device=logp.device)[:, None])
        margin = (logp.max(dim=-1).values - chosen[:, 0]).max().item()
        gap = (chosen[:, 0].cpu() - torch.tensor(sample.logprobs)).abs().max().item()
        worst_margin, worst_logprob = max(worst_margin, margin), max(worst_logprob, gap)
    return {"sequences": len(samples), "worst_argmax_margin": worst_margin,
            "worst_logprob_gap": worst_logprob, "ok": worst_margin <= tie_tolerance}


def kernel_check(model: Any, atol: float) -> dict[str, Any]:
    """Check 2: the first attention layer's GPU paged kernels against the torch version."""
    import torch
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    from parallel.platform import paged_attention

    attention = model.decoder.layers[0].self_attention
    mla = isinstance(attention.config, MLATransformerConfig)
    g = torch.Generator(device="cuda").manual_seed(0)
    block = 64 if mla else 256
    heads = attention.num_attention_heads_per_partition
    lengths, new = [300, 77, 129], [1, 1, 1]
    blocks = sum(-(-n // block) for n in lengths) + 2
    order = torch.randperm(blocks - 1, generator=g, device="cuda")[:blocks - 1].tolist()
    table = torch.full((len(lengths), 8), -1, dtype=torch.int32, device="cuda")
    cursor = 0
    for i, n in enumerate(lengths):
        count = -(-n // block)
        table[i, :count] = torch.tensor(order[cursor:cursor + count], device="cuda")
        cursor += count
    seqlens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    bf16 = torch.bfloat16
    results = {}
    if mla:
        config = attention.config
        width = config.kv_lora_rank + config.qk_pos_emb_head_dim
        cache = torch.randn(blocks, block, width, generator=g, device="cuda", dtype=bf16)
        q = torch.randn(len(lengths), 1, heads, width, generator=g, device="cuda", dtype=bf16)
        cu_q = torch.arange(len(lengths) + 1, dtype=torch.int32, device="cuda")
        cu_k = torch.cat([torch.zeros(1, device="cuda", dtype=torch.int32),
                          seqlens.cumsum(0).int()])
        kernel = attention.flash_decode_and_prefill(q, cache, None, 1, max(lengths), cu_q,
                                                    cu_k, seqlens, table, True)
        reference = paged_attention(q.squeeze(1).float(), cache.float(), None, cu_q, seqlens,
                                    table, attention.softmax_scale,
                                    latent_rank=config.kv_lora_rank)
        results["mla_absorbed_decode"] = (kernel.squeeze(1).float() - reference).abs().max().item()
    else:
        kv_heads = attention.num_query_groups_per_partition
        dim = attention.hidden_size_per_attention_head
        k = torch.randn(blocks, block, kv_heads, dim, generator=g, device="cuda", dtype=bf16)
        v = torch.randn(blocks, block, kv_heads, dim, generator=g, device="cuda", dtype=bf16)
        scale = dim ** -0.5
        for label, fresh, decode_only in (("decode", new, True), ("prefill", [5, 1, 17], False)):
            total = sum(fresh)
            q = torch.randn(total, 1, heads, dim, generator=g, device="cuda", dtype=bf16)
            cu_q = torch.tensor([0, *torch.tensor(fresh).cumsum(0).tolist()], dtype=torch.int32,
                                device="cuda")
            cu_k = torch.cat([torch.zeros(1, device="cuda", dtype=torch.int32),
                              seqlens.cumsum(0).int()])
            kernel = attention.flash_decode_and_prefill(q, k, v, max(fresh), max(lengths), cu_q,
                                                        cu_k, seqlens, table, decode_only)
            reference = paged_attention(q.squeeze(1).float(), k.float(), v.float(), cu_q,
                                        seqlens, table, scale)
            results[label] = (kernel.reshape(total, heads, dim).float()
                              - reference).abs().max().item()
    return {"max_abs_diff": results, "tolerance": atol,
            "ok": all(d <= atol for d in results.values())}


def roofline_check(rollout: Any, model_cfg: Any, batch: int, prompt_len: int,
                   new_tokens: int) -> dict[str, Any]:
    """Check 4: decode tokens/s against the HBM roofline of this GPU."""
    import torch

    from bench.decode_roofline_worker import _best_generate_seconds
    from r1mega.perf.devices import lookup_device, measure_copy_bandwidth
    from r1mega.perf.roofline import (
        decode_step_bytes,
        kv_cache_bytes_per_token,
        model_weight_bytes,
        roofline_tokens_per_s,
    )

    spec = lookup_device(torch.cuda.get_device_name())
    bandwidth = spec.hbm_bytes_per_s if spec is not None else measure_copy_bandwidth(
        "cuda", megabytes=1024)
    prompts = _prompts(model_cfg.vocab_size, batch, prompt_len, seed=3)
    full_s, _ = _best_generate_seconds(rollout, prompts, new_tokens, repeats=2)
    prefill_s, _ = _best_generate_seconds(rollout, prompts, 1, repeats=2)
    step_s = (full_s - prefill_s) / (new_tokens - 1)
    weights = model_weight_bytes(rollout.model, tied_embedding=model_cfg.tie_embeddings)
    step = decode_step_bytes(weights, model_cfg.num_experts, model_cfg.moe_topk, batch,
                             kv_cache_bytes_per_token(rollout.model), prompt_len + new_tokens / 2)
    roof = roofline_tokens_per_s(batch, step.total, bandwidth)
    return {"batch": batch, "decode_step_seconds": step_s, "tokens_per_s": batch / step_s,
            "roofline_tokens_per_s": roof, "fraction_of_roofline": batch / step_s / roof,
            "bandwidth_bytes_per_s": bandwidth, "ok": step_s > 0}


def check_model(name: str, model_config: dict[str, Any], args: argparse.Namespace
                ) -> dict[str, Any]:
    import torch
    from omegaconf import OmegaConf

    from parallel.layout import Layout, initialize_layout
    from parallel.platform import manual_seed
    from r1mega.config.schema import R1MegaConfig
    from r1mega.rollout.colocated import ColocatedRollout
    from r1mega.training.policy import build_policy

    cfg = OmegaConf.merge(OmegaConf.structured(R1MegaConfig), {
        "model": model_config, "precision": {"params_dtype": "bfloat16"},
        "rollout": {"max_batch_size": args.batch, "cuda_graphs": True}})
    initialize_layout(Layout.from_config(cfg.train_layout, 1))
    manual_seed(0)
    policy = build_policy(cfg.model, cfg.train_layout, cfg.precision)
    rollout = ColocatedRollout(cfg, policy, optimizer=None)
    prompts = _prompts(cfg.model.vocab_size, 8, 200, seed=1)
    result: dict[str, Any] = {"model": name}
    result["greedy"] = greedy_check(rollout, policy, prompts, 32, args.tie_tolerance)
    result["kernels"] = kernel_check(rollout.model, args.kernel_atol)
    with torch.no_grad():  # a refit: new weights in the policy, resharded on generate
        for p in policy.unwrapped()[0].parameters():
            p.mul_(1.01)
    after = greedy_check(rollout, policy, prompts, 32, args.tie_tolerance)
    suspended = rollout.engine.resident_kv_bytes()
    result["refit_reset_suspend_resume"] = {
        **after, "kv_bytes_while_suspended": suspended,
        "ok": after["ok"] and suspended == 0}
    result["roofline"] = roofline_check(rollout, cfg.model, args.batch, 512, 128)
    result["ok"] = all(result[k]["ok"] for k in ("greedy", "kernels",
                                                  "refit_reset_suspend_resume", "roofline"))
    return result


def table(results: dict[str, Any]) -> str:
    if results["status"] != "ran":
        return results["status"]
    lines = [f"{results['environment']['device']['name']} ({results['environment']['date']})",
             f"{'model':<14} {'greedy margin':>13} {'logp gap':>9} {'kernel diff':>12} "
             f"{'after refit':>11} {'decode tok/s':>12} {'of roofline':>11}  ok"]
    for r in results["models"]:
        kernel = max(r["kernels"]["max_abs_diff"].values())
        lines.append(
            f"{r['model']:<14} {r['greedy']['worst_argmax_margin']:>13.4f} "
            f"{r['greedy']['worst_logprob_gap']:>9.4f} {kernel:>12.4f} "
            f"{r['refit_reset_suspend_resume']['worst_argmax_margin']:>11.4f} "
            f"{r['roofline']['tokens_per_s']:>12.0f} "
            f"{r['roofline']['fraction_of_roofline']:>11.1%}  {'yes' if r['ok'] else 'NO'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tie-tolerance", type=float, default=0.05,
                        help="bf16: a greedy token may trail the recomputed best by this")
    parser.add_argument("--kernel-atol", type=float, default=2e-2)
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        results = {"status": "skipped: no CUDA GPU"}
    else:
        from bench.bench_common import environment
        from bench.bench_models import GPU_DENSE, GPU_MOE
        from parallel.layout import init_distributed

        init_distributed()
        results = {"status": "ran", "environment": environment(), "models": [
            check_model(name, config, args)
            for name, config in (("dense_1b", GPU_DENSE), ("moe_v3_small", GPU_MOE))]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(table(results))
    if results["status"] != "ran":
        return 0
    return 0 if all(m["ok"] for m in results["models"]) else 1


if __name__ == "__main__":
    sys.exit(main())
