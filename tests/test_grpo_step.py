"""A full GRPO step gives the same updated weights at every layout as at world size 1.

Two steps run, with padded and with THD-packed (padding-free) microbatches, and with the
KL either as a loss term or subtracted from the rewards. The second step's policy has
moved away from the reference, so the k3 KL term and the host-swapped reference pass
contribute gradients. Each step: vocab-parallel
logprobs, reference logprobs, clip-higher GRPO loss with KL, backward through
megatron-core's schedules, gradient finalisation, clipping and the distributed
optimizer's Adam step. Final weights, resharded to each layout, must match the
single-process run within 1e-5 relative (max |w - w_ref| / max |w_ref| per tensor).

Adam's first steps divide each gradient by its own magnitude (plus eps), which turns
fp32 reduction-order noise on near-zero gradient entries into O(lr) differences; the
worker uses lr 1e-4 and eps 1e-6 so that this noise stays below the tolerance while a
wrong gradient (an O(lr) error on every entry) does not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed import ROOT, run_torchrun

WORKER = ROOT / "tests" / "workers" / "grpo_equivalence.py"
REL_TOL = 1e-5


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """Single-process runs. ``kl_reward`` changes the objective, so it has its own; so does
    packed DeepSeek-V3: padding rows count in the MoE router's expert-bias load statistics
    (megatron-core passes no padding mask to it), packed ones do not, so after one update
    the expert biases, and hence the routing, legitimately differ."""
    dirs = {}
    for model, variant in (("dense", "padded"), ("deepseek_v3", "padded"),
                           ("deepseek_v3", "packed"), ("deepseek_v3", "kl_reward")):
        work = tmp_path_factory.mktemp(f"grpo_ref_{model}_{variant}")
        run_torchrun(1, WORKER, model, 1, 1, 1, work, variant)
        dirs[model, variant] = work
    return dirs


LAYOUTS = [
    # (model, tp, pp, ep, world, variant); packed dense runs are compared with the padded
    # single-process reference: packing must not change the result.
    ("dense", 2, 1, 1, 2, "padded"),
    ("dense", 1, 2, 1, 2, "padded"),
    ("deepseek_v3", 2, 1, 1, 2, "padded"),
    ("deepseek_v3", 1, 2, 1, 2, "padded"),
    ("deepseek_v3", 1, 1, 2, 2, "padded"),
    ("deepseek_v3", 2, 1, 2, 4, "padded"),
    ("dense", 2, 2, 1, 4, "padded"),
    ("dense", 1, 2, 1, 2, "packed"),
    ("deepseek_v3", 2, 1, 1, 2, "packed"),
    ("deepseek_v3", 1, 1, 2, 2, "packed"),
    ("deepseek_v3", 1, 2, 1, 2, "kl_reward"),
]


@pytest.mark.parametrize(("model", "tp", "pp", "ep", "world", "variant"), LAYOUTS,
                         ids=[f"{m}-tp{t}pp{p}ep{e}-{v}" for m, t, p, e, _, v in LAYOUTS])
def test_grpo_step_matches_single_process(references: dict[tuple[str, str], Path],
                                          tmp_path: Path, model: str, tp: int, pp: int,
                                          ep: int, world: int, variant: str) -> None:
    reference = references.get((model, variant), references[model, "padded"])
    for name in ("initial", "final"):
        (tmp_path / name).symlink_to(reference / name)
    run_torchrun(world, WORKER, model, tp, pp, ep, tmp_path, variant)
    result = json.loads((tmp_path / "result.json").read_text())
    ref_history = json.loads((reference / "reference.json").read_text())
    assert result["max_rel_weight_diff"] < REL_TOL, result
    for mine, ref in zip(result["history"], ref_history, strict=True):
        assert mine["loss"] == pytest.approx(ref["loss"], rel=REL_TOL, abs=1e-7)
        assert mine["kl_ref"] == pytest.approx(ref["kl_ref"], rel=1e-4, abs=1e-9)
        assert mine["entropy"] == pytest.approx(ref["entropy"], rel=REL_TOL)
    assert ref_history[1]["kl_ref"] > 0  # the reference pass really contributed
    if variant == "kl_reward":
        assert result["history"][1]["kl_penalty_mean"] == pytest.approx(
            ref_history[1]["kl_penalty_mean"], rel=1e-4)
        assert ref_history[1]["kl_penalty_mean"] > 0
