"""Worker for tests/test_resharding.py: generation-layout logits after resharding.

For each case ``model:tp,pp,ep->tp,ep`` (training layout -> generation layout) on this
job's ranks: build the policy in the training layout (fp32, seeded init), build the
generation-layout model on its own process groups, reshard, and compare the generation
model's logits on a fixed batch (gathered over its TP group, on every rank) with the
training-layout model's logits (megatron's pipeline schedule, gathered over TP on the last
stage, broadcast). Then one optimizer step on a language-modelling loss changes the
weights, and the comparison is repeated after a second reshard. Writes the worst
differences, how much the step moved the logits, and the traffic report to
``<out>/<case>.json`` (rank 0).
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
from parallel.process_groups import process_groups_for_layout
from parallel.resharding import WeightResharder
from r1mega.config.schema import LayoutConfig, ModelConfig, TrainConfig
from r1mega.models import build_generation_model
from r1mega.training.batches import causal_lm_batch, data_parallel_microbatches
from r1mega.training.optim import build_optimizer
from r1mega.training.policy import build_policy
from r1mega.training.schedule import forward_backward, lm_loss
from tests.workers.common import TINY_MODELS

BATCH, SEQ = 3, 10


def parse_case(case: str) -> tuple[str, tuple[int, int, int], tuple[int, int]]:
    model, layouts = case.split(":")
    train, gen = layouts.split("->")
    tp, pp, ep = map(int, train.split(","))
    gtp, gep = map(int, gen.split(","))
    return model, (tp, pp, ep), (gtp, gep)


def training_logits(policy, tokens: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits of the training-layout model, on every rank."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    holder: dict[str, torch.Tensor] = {}

    def keep(batch, output):
        holder["logits"] = gather_from_tensor_model_parallel_region(output.float()).detach()
        return output.sum() * 0.0, torch.tensor(1, dtype=torch.int), {}

    batch = {"tokens": tokens, "position_ids": torch.arange(SEQ).expand(BATCH, -1).contiguous()}
    for chunk in policy.unwrapped():
        chunk.eval()
    with torch.no_grad():
        forward_backward(policy, [batch], keep, forward_only=True,
                         model_forward=lambda m, b: m(input_ids=b["tokens"],
                                                      position_ids=b["position_ids"],
                                                      attention_mask=None))
    for chunk in policy.unwrapped():
        chunk.train()
    vocab = policy.unwrapped()[0].vocab_size
    logits = holder.get("logits", torch.zeros(BATCH, SEQ, vocab))
    last = dist.get_global_rank(ps.get_pipeline_model_parallel_group(),
                                ps.get_pipeline_model_parallel_world_size() - 1)
    dist.broadcast(logits, src=last, group=ps.get_pipeline_model_parallel_group())
    return logits


def generation_logits(model, groups, tokens: torch.Tensor) -> torch.Tensor:
    # The generation model of an MLA policy caches latents, which megatron allows only
    # under its dynamic engine; a whole-sequence forward reads the same parameters
    # through the unabsorbed path (tests/test_rollout_engine.py checks the engine's).
    layers = [m for m in model.modules() if getattr(m, "cache_mla_latents", False)]
    holders = [*layers, *{id(m.config): m.config for m in layers}.values()]
    for holder in holders:
        holder.cache_mla_latents = False
    try:
        with torch.no_grad():
            out = model(input_ids=tokens, position_ids=torch.arange(SEQ).expand(BATCH, -1),
                        attention_mask=None).float().contiguous()
    finally:
        for holder in holders:
            holder.cache_mla_latents = True
    parts = [torch.empty_like(out) for _ in range(groups.tp.size())]
    dist.all_gather(parts, out, group=groups.tp)
    return torch.cat(parts, dim=-1)


def optimizer_step(policy, layout: Layout, tokens: torch.Tensor) -> None:
    from megatron.core import parallel_state as ps

    optimizer = build_optimizer(policy, OmegaConf.structured(TrainConfig(lr=1e-2)))
    microbatches = data_parallel_microbatches(causal_lm_batch(tokens), 1,
                                              ps.get_data_parallel_rank(), layout.dp)
    policy.zero_grad()
    forward_backward(policy, microbatches, lm_loss)
    optimizer.step()


def run_case(case: str, out: Path, world_size: int) -> None:
    model_name, (tp, pp, ep), (gtp, gep) = parse_case(case)
    model_cfg = OmegaConf.structured(ModelConfig(**TINY_MODELS[model_name],
                                                 transformer_impl="local"))
    moe = model_cfg.num_experts is not None
    train_cfg = OmegaConf.structured(LayoutConfig(tp=tp, pp=pp, ep=ep,
                                                  sequence_parallel=moe and tp > 1))
    layout = Layout.from_config(train_cfg, world_size)
    initialize_layout(layout)
    manual_seed(1234)
    policy = build_policy(model_cfg, train_cfg, use_distributed_optimizer=True)
    gen_layout = Layout.from_config(OmegaConf.structured(LayoutConfig(tp=gtp, ep=gep)),
                                    world_size, name="generation_layout")
    groups = process_groups_for_layout(gen_layout)
    gen_model = build_generation_model(model_cfg, gen_layout, groups)
    resharder = WeightResharder(policy.chunks, gen_model)

    generator = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, model_cfg.vocab_size, (BATCH, SEQ), generator=generator)
    train_tokens = torch.randint(0, model_cfg.vocab_size, (layout.dp * 2, SEQ + 1),
                                 generator=generator)
    result = {"case": case}
    resharder.reshard()
    before = training_logits(policy, tokens)
    result["max_abs_diff"] = (generation_logits(gen_model, groups, tokens) - before).abs().max()
    optimizer_step(policy, layout, train_tokens)
    resharder.reshard()
    after = training_logits(policy, tokens)
    result["max_abs_diff_after_step"] = (
        generation_logits(gen_model, groups, tokens) - after).abs().max()
    result["step_change"] = (after - before).abs().max()
    result = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in result.items()}
    worst = torch.tensor([result["max_abs_diff"], result["max_abs_diff_after_step"]])
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    result["max_abs_diff"], result["max_abs_diff_after_step"] = worst.tolist()
    traffic = [None] * world_size
    dist.all_gather_object(traffic, resharder.traffic.__dict__)
    result["traffic"] = traffic
    if dist.get_rank() == 0:
        name = case.replace(":", "_").replace(",", "").replace("->", "_to_")
        (out / f"{name}.json").write_text(json.dumps(result))
    dist.barrier()


def main(out: str, *cases: str) -> None:
    env = init_distributed()
    for case in cases:
        run_case(case, Path(out), env.world_size)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:])
