"""Load the model weights of two training checkpoints (saved at any layout) into one
single-process model and report the largest difference."""

from __future__ import annotations

import json
import sys

from parallel.layout import Layout, init_distributed, initialize_layout
from parallel.platform import manual_seed
from r1mega.checkpointing.model_io import load_model
from r1mega.config import load_config
from r1mega.config.schema import LayoutConfig
from r1mega.training.policy import build_policy


def main(config: str, first: str, second: str, out: str) -> None:
    env = init_distributed()
    cfg = load_config(config)
    layout_cfg = LayoutConfig()
    initialize_layout(Layout.from_config(layout_cfg, env.world_size))
    manual_seed(0)
    policy = build_policy(cfg.model, layout_cfg, cfg.precision)
    module = policy.chunks[0].module
    load_model(policy.chunks, f"{first}")
    a = {k: v.detach().clone() for k, v in module.state_dict().items() if hasattr(v, "shape")}
    load_model(policy.chunks, f"{second}")
    b = {k: v.detach().clone() for k, v in module.state_dict().items() if hasattr(v, "shape")}
    diffs = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a}
    with open(out, "w") as f:
        worst = sorted(diffs, key=diffs.get, reverse=True)[:5]
        json.dump({"max_abs_diff": max(diffs.values()), "num_tensors": len(diffs),
                   "worst": {k: diffs[k] for k in worst}}, f)


if __name__ == "__main__":
    main(*sys.argv[1:5])
