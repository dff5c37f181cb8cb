"""Worker for tests/test_convert.py: logits of converted checkpoints at several layouts.

``spec.json`` lists cases ``{"name", "megatron_dir", "hf_config", "tokens", "layouts",
"resave"}``. For each case and layout ``[tp, pp, ep]`` (sequence parallelism on for MoE
with TP > 1) every rank builds its stage of the model from the HF config, loads the
converted checkpoint and runs the forward pass through megatron's pipeline schedule;
the last stage gathers the vocab-parallel logits over TP and writes them to
``<out>/<name>-tp<t>pp<p>ep<e>.pt``. Layouts listed in ``resave`` also save the loaded
weights back as a distributed checkpoint at that layout (``<out>/<name>-saved-...``),
for the HF round trip from a multi-rank checkpoint; ``[1, 1, 1]`` there is megatron's
own save of the model, against which the converter's file layout is compared.
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
from r1mega.checkpointing.model_io import load_model, save_model
from r1mega.config.schema import LayoutConfig
from r1mega.convert import model_config_from_hf
from r1mega.training.policy import build_policy
from r1mega.training.schedule import forward_backward


def _store_logits(batch: dict[str, torch.Tensor], logits: torch.Tensor):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    batch["logits"] = gather_from_tensor_model_parallel_region(logits.float()).detach()
    return logits.sum() * 0.0, torch.tensor(1, dtype=torch.int), {}


def _forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                 attention_mask=None)


def run_case(case: dict, out: Path, world_size: int) -> None:
    from megatron.core import parallel_state as ps

    with open(case["hf_config"]) as f:
        model_cfg = OmegaConf.structured(model_config_from_hf(json.load(f)))
    model_cfg.transformer_impl = "local"
    tokens = torch.load(case["tokens"])
    batch = {"tokens": tokens,
             "position_ids": torch.arange(tokens.shape[1]).expand_as(tokens).contiguous()}
    for tp, pp, ep in case["layouts"]:
        moe = model_cfg.num_experts is not None
        layout_cfg = OmegaConf.structured(LayoutConfig(tp=tp, pp=pp, ep=ep,
                                                       sequence_parallel=moe and tp > 1))
        initialize_layout(Layout.from_config(layout_cfg, world_size))
        manual_seed(1234)
        policy = build_policy(model_cfg, layout_cfg)
        load_model(policy.chunks, case["megatron_dir"])
        for chunk in policy.unwrapped():
            chunk.eval()
        mb = dict(batch)
        with torch.no_grad():
            forward_backward(policy, [mb], _store_logits, forward_only=True,
                             model_forward=_forward)
        tag = f"tp{tp}pp{pp}ep{ep}"
        if (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
                and ps.get_data_parallel_rank() == 0):
            torch.save(mb["logits"], out / f"{case['name']}-{tag}.pt")
        if [tp, pp, ep] in case.get("resave", []):
            save_model(policy.chunks, str(out / f"{case['name']}-saved-{tag}"))
        dist.barrier()


def main(spec_path: str) -> None:
    env = init_distributed()
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    for case in spec["cases"]:
        run_case(case, out, env.world_size)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
