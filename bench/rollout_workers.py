"""Workers of bench/bench_rollout.py (run under torchrun; see that script).

``decode SPEC OUT``: one process. A random transformers model of the spec's shape is
saved, converted with the project's converter and loaded; the same greedy batch is
decoded by the rollout engine and by ``transformers``' ``generate``. Each is run once to
warm up, then timed ``repeats`` times; the best time counts.

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


def decode(spec: dict[str, Any], out: Path) -> None:
    from r1mega.checkpointing.model_io import load_model
    from r1mega.convert import convert_hf_to_megatron, model_config_from_hf
    from r1mega.rollout.colocated import ColocatedRollout
    from r1mega.rollout.types import SamplingParams

    importlib.import_module("torch.utils._device")._device_constructors()
    init_distributed()
    hf = _hf_model(spec)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp + "/hf")
        convert_hf_to_megatron(tmp + "/hf", tmp + "/mg")
        model_cfg = model_config_from_hf(json.loads(Path(tmp + "/hf/config.json").read_text()))
        cfg = OmegaConf.merge(OmegaConf.structured(R1MegaConfig), {
            "model": {**model_cfg.__dict__, "transformer_impl": "local"},
            "precision": {"params_dtype": "float32"},
            "rollout": {"max_batch_size": spec["batch"]}})
        initialize_layout(Layout.from_config(cfg.train_layout, 1))
        manual_seed(0)
        policy = build_policy(cfg.model, cfg.train_layout, cfg.precision)
        load_model(policy.chunks, tmp + "/mg")
    rollout = ColocatedRollout(cfg, policy, optimizer=None)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, hf.config.vocab_size, (spec["batch"], spec["prompt_len"]),
                            generator=g)
    new = spec["new_tokens"]
    params = SamplingParams(max_new_tokens=new, temperature=0.0)

    def engine_run() -> list[list[int]]:
        samples = rollout.generate(prompts.tolist(), params, [0] * len(prompts), [], None)
        return [s.response_ids for s in samples]

    def hf_run() -> list[list[int]]:
        with torch.no_grad():
            ids = hf.generate(prompts, attention_mask=torch.ones_like(prompts),
                              max_new_tokens=new, do_sample=False)
        return ids[:, prompts.shape[1]:].tolist()

    result: dict[str, Any] = {"model": spec["model"], "batch": spec["batch"],
                              "prompt_len": spec["prompt_len"], "new_tokens": new,
                              "parameters": sum(p.numel() for p in hf.parameters())}
    for name, fn in (("engine", engine_run), ("transformers", hf_run)):
        tokens = fn()  # warm-up
        times = []
        for _ in range(spec["repeats"]):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        result[f"{name}_tokens"] = tokens
        result[f"{name}_seconds"] = min(times)
        result[f"{name}_tokens_per_s"] = spec["batch"] * new / min(times)
    result["ratio"] = result["engine_tokens_per_s"] / result["transformers_tokens_per_s"]
    result["same_tokens"] = result.pop("engine_tokens") == result.pop("transformers_tokens")
    out.write_text(json.dumps(result))
    dist.destroy_process_group()


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
    {"decode": decode, "reshard": reshard}[what](spec, Path(out_path))
