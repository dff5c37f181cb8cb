"""Worker for tests/test_rollout_engine.py: the colocated engine on converted tiny models.

``spec.json`` holds ``{"out", "cases": [{"name", "megatron_dir", "hf_config", "train",
"generation", "prompts", "max_new_tokens", "seed"}]}``. For each case every rank builds
the policy in its training layout, loads the converted checkpoint, builds the colocated
rollout (generation layout, resharding, engine) and records, into
``<out>/<name>.json`` (rank 0):

* ``greedy``: greedy responses, several ways: enough slots for every prompt at once
  (``all_at_once``), two slots with refills and a cache so short it must compact
  (``continuous``), and the engine stats of each;
* ``sampled``/``sampled_again``/``sampled_other_batching``: temperature/top-k/top-p
  samples with fixed per-request seeds, repeated, and repeated with other slot counts;
* ``logprob_max_diff``: the sampled tokens' log-probabilities returned by the engine
  against a recomputation by the training-layout forward pass (full vocabulary, same
  temperature);
* ``eos`` / ``stop``: responses with an EOS id and a stop string taken from the greedy
  continuation, with their stop reasons.
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
from r1mega.checkpointing.model_io import load_model
from r1mega.config.schema import R1MegaConfig
from r1mega.convert import model_config_from_hf
from r1mega.rollout.colocated import ColocatedRollout
from r1mega.rollout.types import SamplingParams
from r1mega.training.policy import build_policy
from r1mega.training.schedule import forward_backward

TEMPERATURE, TOP_K, TOP_P = 0.9, 40, 0.95


def decode_ids(ids: list[int]) -> str:
    """A stand-in detokenizer: token 12 is the text ``t12``, tokens joined by spaces."""
    return " ".join(f"t{i}" for i in ids)


def build(case: dict, world_size: int, max_batch_size: int, cache_factor: float):
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
        "rollout": {"max_batch_size": max_batch_size, "kv_cache_length_factor": cache_factor,
                    "prefill_rows": 1},
    })
    layout = Layout.from_config(cfg.train_layout, world_size)
    initialize_layout(layout)
    manual_seed(1234)
    policy = build_policy(cfg.model, cfg.train_layout, cfg.precision)
    load_model(policy.chunks, case["megatron_dir"])
    return policy, ColocatedRollout(cfg, policy, optimizer=None)


def run(rollout: ColocatedRollout, case: dict, params: SamplingParams, stop: list[str] = ()
        ) -> list[dict]:
    prompts = case["prompts"]
    seeds = [case["seed"] + i for i in range(len(prompts))]
    samples = rollout.generate(prompts, params, seeds, list(stop), decode_ids)
    return [{"response": s.response_ids, "logprobs": s.logprobs, "reason": s.stop_reason,
             "finished": s.finished} for s in samples]


def recomputed_logprobs(policy, prompts: list[list[int]], samples: list[dict]) -> float:
    """Worst |engine log-prob - training-layout log-prob| over all sampled tokens."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    worst = torch.zeros(1)
    for prompt, sample in zip(prompts, samples, strict=True):
        ids = prompt + sample["response"]
        tokens = torch.tensor([ids[:-1]])
        holder = {}

        def keep(batch, output, holder=holder):
            holder["logits"] = gather_from_tensor_model_parallel_region(output.float())
            return output.sum() * 0.0, torch.tensor(1, dtype=torch.int), {}

        batch = {"tokens": tokens, "position_ids": torch.arange(tokens.shape[1])[None]}
        with torch.no_grad():
            forward_backward(policy, [batch], keep, forward_only=True,
                             model_forward=lambda m, b: m(input_ids=b["tokens"],
                                                          position_ids=b["position_ids"],
                                                          attention_mask=None))
        if ps.is_pipeline_last_stage():
            logp = torch.log_softmax(holder["logits"][0] / TEMPERATURE, dim=-1)
            start = len(prompt) - 1
            targets = torch.tensor(sample["response"])
            mine = logp[start:start + len(targets)].gather(-1, targets[:, None])[:, 0]
            diff = (mine - torch.tensor(sample["logprobs"])).abs().max()
            worst = torch.maximum(worst, diff[None])
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return worst.item()


def run_case(case: dict, out: Path, world_size: int) -> None:
    max_new = case["max_new_tokens"]
    greedy = SamplingParams(max_new_tokens=max_new, temperature=0.0)
    sampled = SamplingParams(max_new_tokens=max_new, temperature=TEMPERATURE, top_k=TOP_K,
                             top_p=TOP_P)
    result: dict = {}
    policy, rollout = build(case, world_size, max_batch_size=len(case["prompts"]),
                            cache_factor=2.0)
    result["all_at_once"] = run(rollout, case, greedy)
    result["all_at_once_stats"] = rollout.engine.stats.__dict__
    result["sampled"] = run(rollout, case, sampled)
    result["sampled_again"] = run(rollout, case, sampled)
    result["logprob_max_diff"] = recomputed_logprobs(policy, case["prompts"], result["sampled"])
    # Stops chosen from the greedy continuations: an EOS id taken from the first
    # response, a stop string from two consecutive tokens of the second.
    first, second = result["all_at_once"][0]["response"], result["all_at_once"][1]["response"]
    eos_id = first[3]
    stop = decode_ids(second[2:4])
    result["eos_id"], result["stop_string"] = eos_id, stop
    result["eos"] = run(rollout, case, SamplingParams(max_new_tokens=max_new, temperature=0.0,
                                                      eos_id=eos_id))
    result["stop"] = run(rollout, case, greedy, stop=[stop])

    policy, rollout = build(case, world_size, max_batch_size=2, cache_factor=1.0)
    result["continuous"] = run(rollout, case, greedy)
    result["continuous_stats"] = rollout.engine.stats.__dict__
    result["sampled_other_batching"] = run(rollout, case, sampled)
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
