"""Resharding from the training layout to the generation layout preserves the model.

Real processes on gloo (torchrun). For each pair of layouts, the generation-layout model
(its own process groups, built by the same provider) receives the training weights
through megatron-core's refit plan (with the project's fixes for per-expert modules and
tied embeddings), and its logits on a batch must equal the training-layout model's
logits (fp32, < 1e-5); again after an optimizer step changed the weights. The pairs
cover a PP merge (PP2 -> PP1), TP splits and merges, EP changes (EP1 -> EP2, EP2 -> EP1,
EP2 -> EP4 spanning data-parallel replicas), tied embeddings across pipeline stages, and
dense and DeepSeek-V3 (MLA, MoE with shared experts) models.

The traffic each rank's plan moves is checked against an independent count of the
minimum: the bytes of its generation shard that its own training shard does not hold,
computed from the distributed-checkpoint view (global offsets) of both models.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed import ROOT, run_torchrun

WORKER = ROOT / "tests" / "workers" / "reshard_equivalence.py"
TOL = 1e-5

CASES = {
    2: ["dense:1,2,1->2,1", "llama_tied:1,2,1->2,1", "deepseek_v3:1,2,1->2,2",
        "deepseek_v3:1,1,2->1,1"],
    4: ["dense:2,2,1->1,1", "deepseek_v3:1,2,2->1,4", "deepseek_v3:2,1,2->4,4"],
}


def _file(case: str) -> str:
    return case.replace(":", "_").replace(",", "").replace("->", "_to_") + ".json"


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("reshard")
    for world, cases in CASES.items():
        run_torchrun(world, WORKER, out, *cases, timeout=600)
    return {case: json.loads((out / _file(case)).read_text())
            for cases in CASES.values() for case in cases}


ALL = [case for cases in CASES.values() for case in cases]


@pytest.mark.parametrize("case", ALL)
def test_generation_logits_equal_training_logits(results: dict[str, dict], case: str) -> None:
    result = results[case]
    assert result["max_abs_diff"] < TOL, result
    # After an optimizer step the weights differ substantially; resharding follows them.
    assert result["step_change"] > 1e-2, result
    assert result["max_abs_diff_after_step"] < TOL, result


@pytest.mark.parametrize("case", ALL)
def test_plan_moves_only_what_each_rank_lacks(results: dict[str, dict], case: str) -> None:
    for rank, traffic in enumerate(results[case]["traffic"]):
        # Every generation tensor is written exactly once, remotely or from a local copy...
        assert traffic["remote_recv_bytes"] + traffic["local_copy_bytes"] == \
            traffic["generation_bytes"], (rank, traffic)
        # ...and nothing is received that this rank's training shard already holds.
        assert traffic["remote_recv_bytes"] == traffic["minimum_recv_bytes"], (rank, traffic)
    sent = sum(t["remote_send_bytes"] for t in results[case]["traffic"])
    received = sum(t["remote_recv_bytes"] for t in results[case]["traffic"])
    assert sent == received


def test_minimum_is_not_trivially_zero(results: dict[str, dict]) -> None:
    """The layouts differ enough that ranks must exchange data (the count can fail)."""
    for case in ALL:
        assert sum(t["minimum_recv_bytes"] for t in results[case]["traffic"]) > 0, case


def test_generation_layout_needs_one_stage(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from r1mega.config.schema import LayoutConfig, ModelConfig
    from r1mega.models import build_generation_model
    from tests.workers.common import TINY_MODELS

    model = OmegaConf.structured(ModelConfig(**TINY_MODELS["dense"], transformer_impl="local"))
    with pytest.raises(ValueError, match="generation_layout.pp=2"):
        build_generation_model(model, OmegaConf.structured(LayoutConfig(pp=2)), None)
