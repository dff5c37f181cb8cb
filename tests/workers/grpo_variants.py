"""Worker for tests/test_grpo_step.py: the GRPO variants of tests/grpo_reference.py through
megatron's distributed step at one layout, one policy per variant.

``spec.json``: ``{"hf_config": dir, "initial": megatron checkpoint, "layout": [tp, pp, ep,
cp], "out": dir, "variants": [names]}``. For each variant every rank builds its stage of
the policy (sequence parallelism on for MoE under TP), loads the initial weights, and
runs the variant's steps with a fresh optimizer and reference; before each step it
records the rollout's per-token log-probabilities (the step's own forward-only pass,
gathered over DP and CP). Writes ``<out>/<variant>/`` (final weights) and
``<out>/<variant>.json`` (log-probs, per-update records, step metrics). With
``"edge_cases": true`` (one process) it also checks the vocab-parallel log-prob and
entropy functions on their edge cases (``<out>/edge_cases.json``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from parallel.layout import Layout, init_distributed, initialize_layout
from parallel.platform import manual_seed
from r1mega.algorithms import entropy_from_logits
from r1mega.checkpointing.model_io import load_model, save_model
from r1mega.config.schema import GRPOConfig, LayoutConfig, TrainConfig
from r1mega.convert import model_config_from_hf
from r1mega.training.grpo_step import RolloutBatch, grpo_step, policy_logprobs
from r1mega.training.logprobs import vocab_parallel_entropy, vocab_parallel_logprobs
from r1mega.training.optim import build_lr_scheduler, build_optimizer
from r1mega.training.policy import build_policy
from r1mega.training.reference import ReferencePolicy
from tests.grpo_reference import SEQ, VARIANTS, Variant, rollout


def run_variant(variant: Variant, model_cfg, layout_cfg, layout: Layout, initial: str,
                out: Path) -> None:
    policy = build_policy(model_cfg, layout_cfg, use_distributed_optimizer=True)
    load_model(policy.chunks, initial)
    train_cfg = OmegaConf.structured(TrainConfig(**variant.train_config()))
    grpo_cfg = OmegaConf.structured(GRPOConfig(**variant.grpo_config()))
    optimizer = build_optimizer(policy, train_cfg)
    scheduler = build_lr_scheduler(optimizer, train_cfg, variant.updates)
    reference = ReferencePolicy(policy) if grpo_cfg.kl_coef > 0 else None
    record = {"steps": []}
    for step in range(1, variant.steps + 1):
        batch = RolloutBatch(**rollout(variant, model_cfg.vocab_size, step))
        logp = policy_logprobs(policy, batch, train_cfg.micro_batch_size, layout.dp,
                               variant.temperature)
        result = grpo_step(policy, reference, optimizer, scheduler, batch, grpo_cfg, train_cfg,
                           dp_size=layout.dp, temperature=variant.temperature,
                           max_response_len=SEQ, pack=variant.pack)
        record["steps"].append({"logprobs": logp.tolist(), "updates": result.updates,
                                "metrics": result.metrics})
    save_model(policy.chunks, str(out / variant.name))
    if dist.get_rank() == 0:
        (out / f"{variant.name}.json").write_text(json.dumps(record))
    dist.barrier()


def edge_cases() -> dict[str, bool]:
    """Log-probs and entropy on vocab-parallel logits where they used to go wrong: the
    caller's fp32 logits overwritten when the batch or sequence dimension is 1 at T=1,
    and NaN entropy on -inf logits (masked vocabulary entries)."""
    gen = torch.Generator().manual_seed(7)
    out = {}
    for shape in ((1, 5, 11), (3, 1, 11)):
        logits = torch.randn(*shape, generator=gen)
        before = logits.clone()
        targets = torch.randint(0, shape[-1], shape[:2], generator=gen)
        logp = vocab_parallel_logprobs(logits, targets, 1.0)
        want = torch.log_softmax(before, -1).gather(-1, targets[..., None])[..., 0]
        out[f"unchanged_{shape}"] = torch.equal(logits, before)
        out[f"logprobs_{shape}"] = bool(torch.allclose(logp, want, atol=1e-6))
    logits = torch.randn(2, 4, 11, generator=gen)
    logits[..., 3:6] = float("-inf")
    entropy = vocab_parallel_entropy(logits)
    out["entropy_finite_with_-inf"] = bool(torch.isfinite(entropy).all())
    out["entropy_matches"] = bool(torch.allclose(entropy, entropy_from_logits(logits),
                                                 atol=1e-6))
    return out


def main(spec_path: str) -> None:
    env = init_distributed()
    spec = json.loads(Path(spec_path).read_text())
    with open(Path(spec["hf_config"]) / "config.json") as f:
        model_cfg = OmegaConf.structured(model_config_from_hf(json.load(f)))
    model_cfg.transformer_impl = "local"
    tp, pp, ep, cp = spec["layout"]
    moe = model_cfg.num_experts is not None
    layout_cfg = OmegaConf.structured(LayoutConfig(tp=tp, pp=pp, ep=ep, cp=cp,
                                                   sequence_parallel=moe and tp > 1))
    layout = Layout.from_config(layout_cfg, env.world_size)
    initialize_layout(layout)
    out = Path(spec["out"])
    if spec.get("edge_cases") and env.world_size == 1:
        (out / "edge_cases.json").write_text(json.dumps(edge_cases()))
    for name in spec["variants"]:
        manual_seed(1234)
        torch.manual_seed(1234)
        run_variant(VARIANTS[name], model_cfg, layout_cfg, layout, spec["initial"], out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
