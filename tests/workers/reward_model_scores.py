"""Worker for tests/test_reward_model.py: reward-model scores at one layout.

Builds the training layout ``tp,pp`` on this job's ranks, loads each reward model given
as ``name=DIR`` (a converted checkpoint or a Hugging Face directory, converted into
``<out>/cache`` on first use) with :class:`RewardModelScorer` and writes the scores of the
given (prompt, response) pairs to ``<out>/scores-tp<t>pp<p>-<name>.json`` (rank 0).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist
from omegaconf import OmegaConf

from parallel.layout import Layout, init_distributed, initialize_layout
from parallel.platform import manual_seed
from r1mega.config.schema import LayoutConfig, PrecisionConfig, RewardModelConfig
from r1mega.data.tokenizers import ByteTokenizer
from r1mega.rewards.reward_model import RewardModelScorer


def main(pairs_file: str, out: str, tp: int, pp: int, models: list[str]) -> None:
    env = init_distributed()
    layout_cfg = OmegaConf.structured(LayoutConfig(tp=tp, pp=pp))
    initialize_layout(Layout.from_config(layout_cfg, env.world_size))
    manual_seed(0)
    pairs = json.loads(Path(pairs_file).read_text())
    for model in models:
        name, rm_dir = model.split("=", 1)
        scorer = RewardModelScorer(RewardModelConfig(load=rm_dir, scale=1.0), ByteTokenizer(),
                                   "none", layout_cfg, PrecisionConfig(params_dtype="float32"),
                                   micro_batch_size=2, cache_root=Path(out) / "cache")
        scores = scorer.score([p for p, _ in pairs], [r for _, r in pairs])
        if env.rank == 0:
            Path(out, f"scores-tp{tp}pp{pp}-{name}.json").write_text(json.dumps(scores))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:])
