"""Workers of bench/bench_rollout.py (run under torchrun; see that script).

``rl SPEC OUT``: one process, the spec's systems (the rollout engine with and without
prefix caching, ``transformers``' ``generate``, or the retired engine when run from an old
checkout) on an RL-shaped workload: a random transformers model of the spec's shape, its
EOS made likely enough that responses end at EOS after ~``mean_length`` tokens (spread
roughly geometrically), saved, converted with the project's converter and loaded;
``prompts`` prompts x ``group`` samples each at temperature 1. A warm-up run each, then
``repeats`` rounds in which the systems take turns, on the same weights.

``reshard SPEC OUT``: N processes. For each layout pair the training-layout model is
resharded into the generation layout with the project's plan, and with a naive
baseline: every rank first receives the *whole* model (a full replica, what an
all-gather of every tensor gives) and then slices its generation shard out of it
locally. Times are the median of ``repeats`` runs; bytes are per rank.
"""

from __future__ import annotations

import importlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from parallel.layout import Layout, init_distributed, initialize_layout
from parallel.platform import manual_seed
from parallel.process_groups import process_groups_for_layout
from parallel.resharding import WeightResharder
from r1mega.config.schema import LayoutConfig, ModelConfig, R1MegaConfig
from r1mega.models import build_generation_model
from r1mega.training.policy import build_policy


def _hf_model(spec: dict[str, Any]) -> Any:
    import transformers

    kind = spec["model"]
    if kind == "deepseek_v3":
        config = transformers.DeepseekV3Config(**spec["hf_config"])
    else:
        config = transformers.Qwen2Config(**spec["hf_config"])
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _calibrate_eos(model: Any, eos_id: int, mean_length: int, prompt_len: int) -> None:
    """Tilt the EOS row of the output head towards the mean final hidden state until EOS
    has probability ~1/mean_length at temperature 1 along the model's own sampled
    continuations: responses then end at EOS after a spread of lengths (roughly
    geometric; a random model would otherwise almost never stop)."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, model.config.vocab_size, (16, prompt_len), generator=g)
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        torch.manual_seed(2)
        ids = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                             max_new_tokens=2 * mean_length, eos_token_id=None, top_k=0)
        hidden = model.model(input_ids=ids).last_hidden_state[:, prompt_len - 1:-1]
        hidden = hidden.reshape(-1, model.config.hidden_size)
        head = model.lm_head.weight
        base = head[eos_id].clone()
        direction = hidden.mean(0) / hidden.mean(0).norm()
        low, high = 0.0, 256.0
        for _ in range(40):  # bisection on the tilt
            mid = (low + high) / 2
            head[eos_id] = base + mid * direction
            p = torch.softmax(hidden @ head.T, dim=-1)[:, eos_id].mean()
            low, high = (mid, high) if p < 1.0 / mean_length else (low, mid)
        head[eos_id] = base + low * direction


def _build_models(spec: dict[str, Any], tmp: str) -> tuple[Any, Any, Any]:
    """(transformers model, project config, training-layout policy) with equal weights."""
    from r1mega.checkpointing.model_io import load_model
    from r1mega.convert import convert_hf_to_megatron, model_config_from_hf

    hf = _hf_model(spec)
    _calibrate_eos(hf, spec["eos_id"], spec["mean_length"], spec["prompt_len"])
    hf.save_pretrained(tmp + "/hf")
    convert_hf_to_megatron(tmp + "/hf", tmp + "/mg")
    model_cfg = model_config_from_hf(json.loads(Path(tmp + "/hf/config.json").read_text()))
    cfg = OmegaConf.merge(OmegaConf.structured(R1MegaConfig), {
        "model": {**model_cfg.__dict__, "transformer_impl": "local"},
        "precision": {"params_dtype": "float32"},
        "rollout": {"max_batch_size": spec["max_batch_size"], **spec.get("rollout", {})}})
    initialize_layout(Layout.from_config(cfg.train_layout, 1))
    manual_seed(0)
    policy = build_policy(cfg.model, cfg.train_layout, cfg.precision)
    load_model(policy.chunks, tmp + "/mg")
    return hf, cfg, policy


def rl_workload(spec: dict[str, Any], out: Path) -> None:
    """``spec["systems"]`` (engine | engine_no_prefix_cache | transformers) on the
    RL-shaped workload: ``prompts`` prompts x ``group`` samples each, temperature 1,
    responses ending at EOS (or ``max_new`` tokens). One warm-up run each, then
    ``repeats`` rounds in which every system runs once, in turn."""
    from r1mega.rollout.colocated import ColocatedRollout
    from r1mega.rollout.types import SamplingParams

    importlib.import_module("torch.utils._device")._device_constructors()
    init_distributed()
    with tempfile.TemporaryDirectory() as tmp:
        hf, cfg, policy = _build_models(spec, tmp)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, hf.config.vocab_size, (spec["prompts"], spec["prompt_len"]),
                            generator=g).repeat_interleave(spec["group"], dim=0)
    eos, new = spec["eos_id"], spec["max_new"]
    hf.generation_config.pad_token_id = 0

    def transformers_once(seed: int) -> dict[str, Any]:
        torch.manual_seed(seed)
        lengths = []
        start = time.perf_counter()
        for i in range(0, len(prompts), spec["max_batch_size"]):  # padded batches
            batch = prompts[i:i + spec["max_batch_size"]]
            with torch.no_grad():
                ids = hf.generate(batch, attention_mask=torch.ones_like(batch),
                                  max_new_tokens=new, do_sample=True, temperature=1.0,
                                  top_k=0, top_p=1.0, eos_token_id=eos)
            for row in ids[:, batch.shape[1]:].tolist():
                lengths.append(row.index(eos) + 1 if eos in row else len(row))
        return {"seconds": time.perf_counter() - start, "lengths": lengths}

    def engine_once(prefix_caching: bool) -> Any:
        engine_cfg = OmegaConf.merge(cfg, {"rollout": {"prefix_caching": prefix_caching}})
        rollout = ColocatedRollout(engine_cfg, policy, optimizer=None)
        params = SamplingParams(max_new_tokens=new, temperature=1.0, eos_id=eos)

        def once(seed: int) -> dict[str, Any]:
            start = time.perf_counter()
            samples = rollout.generate(prompts.tolist(), params,
                                       [seed * 100_003 + i for i in range(len(prompts))], [],
                                       None)
            seconds = time.perf_counter() - start
            stats = rollout.engine.stats
            return {"seconds": seconds, "lengths": [len(s.response_ids) for s in samples],
                    "prefill_tokens_computed": stats.prefill_tokens_computed,
                    "prefill_tokens_skipped": stats.prefill_tokens_skipped,
                    "kv_bytes_per_token": stats.kv_bytes_per_token, "steps": stats.steps}

        return once

    makers = {"engine": lambda: engine_once(True),
              "engine_no_prefix_cache": lambda: engine_once(False),
              "transformers": lambda: transformers_once,
              # The retired engine (run from an old checkout): same interface, no options.
              "old_engine": lambda: _old_engine_once(cfg, policy, prompts, new, eos)}
    systems = {name: makers[name]() for name in spec["systems"]}
    for once in systems.values():
        once(0)  # warm-up
    result: dict[str, Any] = {"model": spec["model"], "sequences": len(prompts),
                              "parameters": sum(p.numel() for p in hf.parameters()),
                              "runs": {name: [] for name in systems}}
    for r in range(spec["repeats"]):
        for name, once in systems.items():
            run = once(spec["seed"] + r)
            run["tokens_per_s"] = sum(run["lengths"]) / run["seconds"]
            result["runs"][name].append(run)
    out.write_text(json.dumps(result))
    dist.destroy_process_group()


def _old_engine_once(cfg: Any, policy: Any, prompts: torch.Tensor, new: int, eos: int) -> Any:
    from r1mega.rollout.colocated import ColocatedRollout
    from r1mega.rollout.types import SamplingParams

    rollout = ColocatedRollout(cfg, policy, optimizer=None)
    params = SamplingParams(max_new_tokens=new, temperature=1.0, eos_id=eos)

    def once(seed: int) -> dict[str, Any]:
        start = time.perf_counter()
        samples = rollout.generate(prompts.tolist(), params,
                                   [seed * 100_003 + i for i in range(len(prompts))], [], None)
        return {"seconds": time.perf_counter() - start,
                "lengths": [len(s.response_ids) for s in samples]}

    return once


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        dist.barrier()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reshard(spec: dict[str, Any], out: Path) -> None:
    env = init_distributed()
    model_cfg = OmegaConf.structured(ModelConfig(**spec["model_config"]))
    moe = model_cfg.num_experts is not None
    results = []
    for pair in spec["pairs"]:
        (tp, pp, ep), (gtp, gep) = pair["train"], pair["generation"]
        train_cfg = OmegaConf.structured(LayoutConfig(tp=tp, pp=pp, ep=ep,
                                                      sequence_parallel=moe and tp > 1))
        initialize_layout(Layout.from_config(train_cfg, env.world_size))
        manual_seed(0)
        policy = build_policy(model_cfg, train_cfg)

        def generation_model(tp_size: int, ep_size: int) -> Any:
            layout = Layout.from_config(
                OmegaConf.structured(LayoutConfig(tp=tp_size, ep=ep_size)), env.world_size)
            return build_generation_model(model_cfg, layout, process_groups_for_layout(layout))

        target = generation_model(gtp, gep)
        replica = generation_model(1, 1)  # every rank holds the whole model
        planned = WeightResharder(policy.chunks, target)
        gather_all = WeightResharder(policy.chunks, replica)
        slice_local = WeightResharder([replica], target)
        plan_s = _median_seconds(planned.reshard, spec["repeats"])
        naive_s = _median_seconds(
            lambda gather=gather_all, local=slice_local: (gather.reshard(), local.reshard()),
            spec["repeats"])
        mine = {"plan_remote_bytes": planned.traffic.remote_recv_bytes,
                "minimum_bytes": planned.traffic.minimum_recv_bytes,
                "naive_remote_bytes": gather_all.traffic.remote_recv_bytes
                + slice_local.traffic.remote_recv_bytes,
                "generation_bytes": planned.traffic.generation_bytes}
        per_rank: list[Any] = [None] * env.world_size
        dist.all_gather_object(per_rank, mine)
        results.append({"train": f"TP{tp} PP{pp} EP{ep}", "generation": f"TP{gtp} EP{gep}",
                        "plan_seconds": plan_s, "naive_seconds": naive_s,
                        "speedup": naive_s / plan_s, "per_rank": per_rank})
    if env.rank == 0:
        out.write_text(json.dumps({"world_size": env.world_size, "model": spec["name"],
                                   "parameters": _parameters(model_cfg), "pairs": results}))
    dist.barrier()
    dist.destroy_process_group()


def _parameters(model_cfg: Any) -> int:
    from r1mega.planner.params import count_parameters

    return int(count_parameters(model_cfg).total)


if __name__ == "__main__":
    what, spec_path, out_path = sys.argv[1:4]
    spec = json.loads(Path(spec_path).read_text())
    {"rl": rl_workload, "reshard": reshard}[what](spec, Path(out_path))
