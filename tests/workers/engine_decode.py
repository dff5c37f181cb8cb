"""Worker for tests/test_rollout_engine.py: the rollout engine on converted tiny models.

``spec.json`` holds ``{"out", "cases": [{"name", "megatron_dir", "hf_config", "train",
"generation", "prompts", "long_prompt", "max_new_tokens", "seed", "block_tokens",
"extras"}]}``. For each case every rank builds the policy in its training layout, loads
the converted checkpoint, builds the colocated rollout (generation layout, resharding,
megatron's dynamic inference engine) and records, into ``<out>/<name>.json`` (rank 0):

* ``all_at_once``: greedy responses with room for every prompt at once, and the stats;
* ``sampled``/``sampled_again``: temperature/top-k/top-p samples with fixed per-request
  seeds, twice; ``sampled_other_batching``: the same with two requests at a time;
* ``logprob_max_diff``: the engine's log-probabilities of the sampled tokens against a
  recomputation by the training-layout forward pass (full vocabulary, same temperature);
* ``eos`` / ``stop``: responses with an EOS id and a stop string taken from the greedy
  continuation, with their stop reasons;
* ``continuous``: greedy with two requests at a time; ``chunked``: the long prompt's group
  with a 64-token step budget (chunked prefill);
* ``group``: ``GROUP`` copies of a prompt longer than a KV block (a GRPO group), greedy,
  with the prefill counters; ``memory``: the KV bytes held during and after generation.

``extras`` adds: ``stale`` (a weight change between two calls whose prompts share cached
blocks: the engine against a full recompute, and the same with the reset switched off);
``routing`` (routing replay: the generation model's expert bias is perturbed after each
refit so its routing differs from the trainer's; training-layout log-probabilities with
and without replaying the recorded experts, and GRPO steps' parity metrics, one of them
with two minibatches).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.inference.utils import InferenceMode
from omegaconf import OmegaConf

from parallel.layout import Layout, init_distributed, initialize_layout
from parallel.platform import manual_seed
from r1mega.checkpointing.model_io import load_model
from r1mega.config.schema import R1MegaConfig
from r1mega.convert import model_config_from_hf
from r1mega.rollout.batch import build_rollout_batch
from r1mega.rollout.colocated import ColocatedRollout
from r1mega.rollout.simple_sampler import generate as recompute_generate
from r1mega.rollout.types import SamplingParams
from r1mega.training.grpo_step import grpo_step
from r1mega.training.optim import build_lr_scheduler, build_optimizer
from r1mega.training.packing import packed_rl_forward
from r1mega.training.policy import build_policy
from r1mega.training.routing_replay import with_routing_replay
from r1mega.training.schedule import forward_backward

TEMPERATURE, TOP_K, TOP_P = 0.9, 40, 0.95
GROUP = 4


def decode_ids(ids: list[int]) -> str:
    """A stand-in detokenizer: token 12 is the text ``t12``, tokens joined by spaces."""
    return " ".join(f"t{i}" for i in ids)


def build(case: dict, world_size: int, **rollout: object):
    """Training-layout policy with the converted weights and a colocated rollout."""
    model_cfg = model_config_from_hf(json.loads(Path(case["hf_config"]).read_text()))
    tp, pp, ep = case["train"]
    gtp, gep = case["generation"]
    moe = model_cfg.num_experts is not None
    cfg = OmegaConf.merge(OmegaConf.structured(R1MegaConfig), {
        "model": {**model_cfg.__dict__, "transformer_impl": "local"},
        "precision": {"params_dtype": "float32"},
        "train_layout": {"tp": tp, "pp": pp, "ep": ep, "sequence_parallel": moe and tp > 1},
        "generation_layout": {"tp": gtp, "ep": gep},
        "train": {"lr": 0.0, "seq_length": 32, "micro_batch_size": 1, "use_distributed_optimizer":
                  False, "pack_sequences": True},
        "grpo": {"group_size": len(case["prompts"]), "kl_coef": 0.0},
        "rollout": {"kv_block_tokens": case["block_tokens"], **rollout},
    })
    layout = Layout.from_config(cfg.train_layout, world_size)
    initialize_layout(layout)
    manual_seed(1234)
    policy = build_policy(cfg.model, cfg.train_layout, cfg.precision)
    load_model(policy.chunks, case["megatron_dir"])
    return cfg, layout, policy, ColocatedRollout(cfg, policy, optimizer=None)


def run(rollout: ColocatedRollout, prompts: list[list[int]], params: SamplingParams,
        seed: int, stop: list[str] = ()) -> list[dict]:
    seeds = [seed + i for i in range(len(prompts))]
    samples = rollout.generate(prompts, params, seeds, list(stop), decode_ids)
    return [{"response": s.response_ids, "logprobs": s.logprobs, "reason": s.stop_reason,
             "finished": s.finished} for s in samples]


def training_logprob_gap(policy, prompts: list[list[int]], samples: list[dict],
                         temperature: float, replay: bool = False) -> float:
    """Worst |engine log-prob - training-layout log-prob| over all sampled tokens (job-wide);
    ``replay`` routes the training forward by each sample's recorded experts."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    worst = torch.zeros(1)
    forward = with_routing_replay(packed_rl_forward)
    for prompt, sample in zip(prompts, samples, strict=True):
        response, logprobs = sample["response"], sample["logprobs"]
        ids = prompt + response
        batch = {"tokens": torch.tensor([ids[:-1]]),
                 "position_ids": torch.arange(len(ids) - 1)[None]}
        if replay:
            batch["routing"] = sample["routing"][None].long()
        holder = {}

        def keep(batch, output, holder=holder):
            holder["logits"] = gather_from_tensor_model_parallel_region(output.float())
            return output.sum() * 0.0, torch.tensor(1, dtype=torch.int), {}

        with torch.no_grad():
            forward_backward(policy, [batch], keep, forward_only=True, model_forward=forward)
        if ps.is_pipeline_last_stage():
            logp = torch.log_softmax(holder["logits"][0] / temperature, dim=-1)
            start = len(prompt) - 1
            targets = torch.tensor(response)
            mine = logp[start:start + len(targets)].gather(-1, targets[:, None])[:, 0]
            diff = (mine - torch.tensor(logprobs)).abs().max()
            worst = torch.maximum(worst, diff[None])
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return worst.item()


def stale_cache_check(cfg, policy, rollout: ColocatedRollout, case: dict) -> dict:
    """Generate for prompts sharing a cached block, change the policy's weights, generate
    again: the first token's log-probability against a no-cache recompute with the new
    weights; then the same with the engine's reset switched off (the negative control)."""
    prompts = [case["long_prompt"], case["long_prompt"][:-1] + [3]]
    params = SamplingParams(max_new_tokens=2, temperature=0.0)
    result = {}
    for label, keep_cache in (("engine", False), ("without_reset", True)):
        if keep_cache:  # no suspend/resume either (resuming re-initialises the buffers)
            rollout.engine.suspend = lambda: None
        run(rollout, prompts, params, 0)
        if keep_cache:
            rollout.engine._engine.reset = lambda: None
        with torch.no_grad():
            for p in policy.unwrapped()[0].parameters():
                p.mul_(1.25)
        fresh = run(rollout, prompts, params, 0)
        InferenceMode.unset_active()  # the engine was left running (not suspended)
        reference = recompute_generate(policy, prompts, params, [0, 0], micro_batch_size=1)
        result[label] = max(abs(f["logprobs"][0] - r.logprobs[0])
                            for f, r in zip(fresh, reference, strict=True))
    return result


def routing_check(case: dict, world_size: int) -> dict:
    """Routing replay where rollout and trainer would route differently."""
    cfg, layout, policy, rollout = build(case, world_size, routing_replay=True,
                                         max_batch_size=8)
    reshard = rollout.resharder.reshard

    def reshard_then_perturb_routing() -> float:
        seconds = reshard()
        g = torch.Generator().manual_seed(5)
        from megatron.core.transformer.moe.router import TopKRouter

        for module in rollout.model.modules():
            if isinstance(module, TopKRouter) and module.expert_bias is not None:
                module.expert_bias.add_(0.5 * torch.randn(module.expert_bias.shape,
                                                          generator=g))
        return seconds

    rollout.resharder.reshard = reshard_then_perturb_routing
    prompts = case["prompts"]
    params = SamplingParams(max_new_tokens=case["max_new_tokens"], temperature=1.0)
    samples = rollout.generate(prompts, params, [7 + i for i in range(len(prompts))], [],
                               decode_ids)
    records = [{"response": s.response_ids, "logprobs": s.logprobs, "routing": s.routing}
               for s in samples]
    result = {
        "routing_shapes": [list(s.routing.shape) for s in samples],
        "lengths": [len(p) + len(s.response_ids) - 1 for p, s in zip(prompts, samples,
                                                                      strict=True)],
        "gap_without_replay": training_logprob_gap(policy, prompts, records, 1.0),
        "gap_with_replay": training_logprob_gap(policy, prompts, records, 1.0, replay=True),
    }
    optimizer = build_optimizer(policy, cfg.train, cfg.precision)
    scheduler = build_lr_scheduler(optimizer, cfg.train)
    batch, _ = build_rollout_batch(samples, [float(i) for i in range(len(samples))],
                                   cfg.train.seq_length, pad_id=0)
    for label, routing in (("step_with_replay", batch.routing), ("step_without_replay", None)):
        batch.routing = routing
        # fp32 rounding stays below 1e-5: a gap over 1e-3 is a routing flip.
        metrics = grpo_step(policy, None, optimizer, scheduler, batch, cfg.grpo, cfg.train,
                            dp_size=layout.dp, temperature=1.0, pack=True,
                            logprob_outlier_threshold=1e-3).metrics
        result[label] = {k: v for k, v in metrics.items() if k.startswith("rollout/")}
    # Several updates per rollout: each minibatch (two groups of two here) replays its own
    # rows' routing, in the old-log-prob pass and in its update.
    grpo_cfg = OmegaConf.merge(cfg.grpo, {"group_size": 2, "minibatches": 2})
    batch, _ = build_rollout_batch(samples[:4], [0.0, 1.0, 2.0, 0.0], cfg.train.seq_length,
                                   pad_id=0)
    metrics = grpo_step(policy, None, optimizer, scheduler, batch, grpo_cfg, cfg.train,
                        dp_size=layout.dp, temperature=1.0, pack=True,
                        logprob_outlier_threshold=1e-3).metrics
    result["minibatches_with_replay"] = {k: v for k, v in metrics.items()
                                         if k.startswith("rollout/") or k == "updates"}
    return result


def run_case(case: dict, out: Path, world_size: int) -> None:
    max_new, seed, prompts = case["max_new_tokens"], case["seed"], case["prompts"]
    greedy = SamplingParams(max_new_tokens=max_new, temperature=0.0)
    sampled = SamplingParams(max_new_tokens=max_new, temperature=TEMPERATURE, top_k=TOP_K,
                             top_p=TOP_P)
    result: dict = {}
    cfg, _, policy, rollout = build(case, world_size, max_batch_size=8)
    result["all_at_once"] = run(rollout, prompts, greedy, seed)
    result["all_at_once_stats"] = vars(rollout.engine.stats)
    result["sampled"] = run(rollout, prompts, sampled, seed)
    result["sampled_again"] = run(rollout, prompts, sampled, seed)
    result["logprob_max_diff"] = training_logprob_gap(policy, prompts, result["sampled"],
                                                      TEMPERATURE)
    # Stops chosen from the greedy continuations: an EOS id taken from the first
    # response, a stop string from two consecutive tokens of the second.
    first, second = result["all_at_once"][0]["response"], result["all_at_once"][1]["response"]
    eos_id = first[3]
    stop = decode_ids(second[2:4])
    result["eos_id"], result["stop_string"] = eos_id, stop
    result["eos"] = run(rollout, prompts, SamplingParams(max_new_tokens=max_new,
                                                         temperature=0.0, eos_id=eos_id), seed)
    result["stop"] = run(rollout, prompts, greedy, seed, stop=[stop])
    result["group"] = run(rollout, [case["long_prompt"]] * GROUP, greedy, seed)
    result["group_stats"] = vars(rollout.engine.stats)
    result["memory"] = {k: v for k, v in rollout.metrics.items() if "kv_cache" in k}
    result["memory"]["after"] = rollout.engine.resident_kv_bytes()
    context = rollout.engine._engine.context  # megatron's own figure for its KV blocks
    result["memory"]["context_bytes_per_token"] = (context.block_size_bytes
                                                   // context.block_size_tokens)
    if "stale" in case["extras"]:
        result["stale"] = stale_cache_check(cfg, policy, rollout, case)

    cfg, _, policy, rollout = build(case, world_size, max_batch_size=2, max_tokens_per_step=64)
    result["continuous"] = run(rollout, prompts, greedy, seed)
    result["continuous_stats"] = vars(rollout.engine.stats)
    dummy = torch.tensor([rollout.engine.stats.dummy_steps])
    dist.all_reduce(dummy)
    result["continuous_dummy_steps_all_ranks"] = int(dummy)
    result["chunked"] = run(rollout, [case["long_prompt"]] * GROUP, greedy, seed)
    result["chunked_stats"] = vars(rollout.engine.stats)
    result["sampled_other_batching"] = run(rollout, prompts, sampled, seed)
    if "routing" in case["extras"]:
        result["routing"] = routing_check(case, world_size)
    if dist.get_rank() == 0:
        (out / f"{case['name']}.json").write_text(json.dumps(result))
    dist.barrier()


def main(spec_path: str) -> None:
    env = init_distributed()
    spec = json.loads(Path(spec_path).read_text())
    for case in spec["cases"]:
        run_case(case, Path(spec["out"]), env.world_size)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
