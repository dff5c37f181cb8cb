"""Loss and gradients under TP/PP/EP layouts equal the single-process model's.

Each layout runs as real processes on gloo (torchrun). The single-process run saves its
initial weights and its gradients as distributed checkpoints; every layout loads the
same weights, runs the same global batch (split over microbatches and DP ranks through
megatron-core's pipeline schedules) and compares its gradients, resharded to its own
layout, against the reference: max |g - g_ref| / max |g_ref| per parameter < 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed import ROOT, run_torchrun

WORKER = ROOT / "tests" / "workers" / "layout_equivalence.py"
REL_TOL = 1e-5


@pytest.fixture(scope="module")
def reference_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Single-process weights, loss and gradients of each tiny model, computed once."""
    dirs = {}
    for model in ("dense", "llama_tied", "deepseek_v3"):
        work = tmp_path_factory.mktemp(f"ref_{model}")
        run_torchrun(1, WORKER, model, 1, 1, 1, work)
        dirs[model] = work
    return dirs


LAYOUTS = [
    # (model, tp, pp, ep, world size)
    ("dense", 2, 1, 1, 2),
    ("dense", 1, 2, 1, 2),
    ("dense", 2, 2, 1, 4),
    ("llama_tied", 1, 2, 1, 2),
    ("deepseek_v3", 2, 1, 1, 2),
    ("deepseek_v3", 1, 2, 1, 2),
    ("deepseek_v3", 1, 1, 2, 2),
    ("deepseek_v3", 2, 2, 1, 4),
    ("deepseek_v3", 2, 1, 2, 4),
]


@pytest.mark.parametrize(("model", "tp", "pp", "ep", "world"), LAYOUTS,
                         ids=[f"{m}-tp{t}pp{p}ep{e}" for m, t, p, e, _ in LAYOUTS])
def test_layout_matches_single_process(reference_dirs: dict[str, Path], tmp_path: Path,
                                       model: str, tp: int, pp: int, ep: int,
                                       world: int) -> None:
    reference = reference_dirs[model]
    work = tmp_path / "layout"
    work.mkdir()
    for name in ("weights", "grads"):
        (work / name).symlink_to(reference / name)
    run_torchrun(world, WORKER, model, tp, pp, ep, work)
    result = json.loads((work / "result.json").read_text())
    ref_loss = json.loads((reference / "reference.json").read_text())["loss"]
    assert result["loss"] == pytest.approx(ref_loss, rel=REL_TOL)
    assert result["max_rel_grad_diff"] < REL_TOL, result
    assert result["num_params"] > 0
