"""Every shipped config runs: the GPU recipes scaled down in sizes only, the tiny ones by
the tests that own them.

``configs/r1_zero_671b.yaml`` (DeepSeek-R1-Zero's schedule: clip 10, seq-mean-token-mean,
k3, several minibatches per rollout, the reference reset, the response-length schedule, MTP,
expert-bias routing, SP, the distributed optimizer, full recompute) and
``configs/qwen2_5_7b.yaml`` are loaded as they are, with only the size overrides of
:mod:`tests.recipes` (and its one stated precision exception), and trained for 3 RL steps
on CPU processes (4 and 2) with a checkpoint after each, then resumed for a fourth. The Slurm
test submits the same scaled 671B recipe with ``sbatch`` (tests/test_slurm.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from r1mega.checkpointing.train_state import step_dir
from tests.distributed import ROOT
from tests.recipes import (
    PRECISION_EXCEPTION,
    QWEN2_5_7B_SCALED,
    R1_ZERO_671B_SCALED,
    check_scaling,
)

#: The test that runs each shipped config through real steps.
CONFIG_TESTS = {
    "r1_zero_671b.yaml": "tests/test_recipes.py",
    "qwen2_5_7b.yaml": "tests/test_recipes.py",
    "tiny_cpu.yaml": "tests/test_cli.py",
    "r1_zero_tiny_cpu.yaml": "tests/test_rl_learns.py",
    "sft_tiny_cpu.yaml": "tests/test_sft.py",
    "distill_tiny_cpu.yaml": "tests/test_sft.py",
    "sample_tiny_cpu.yaml": "tests/test_rejection.py",
    "r1_stage2_tiny_cpu.yaml": "tests/test_stage2.py",
    "hf_tiny_cpu.yaml": "tests/test_hf_user_path.py",
}


def test_every_shipped_config_is_run_by_a_test() -> None:
    shipped = {p.name for p in (ROOT / "configs").glob("*.yaml")}
    assert shipped == set(CONFIG_TESTS), (
        f"shipped configs without a test that runs them: {sorted(shipped - set(CONFIG_TESTS))}"
        f"; listed but gone: {sorted(set(CONFIG_TESTS) - shipped)}")
    for name, test in CONFIG_TESTS.items():
        assert f"configs/{name}" in (ROOT / test).read_text(), (name, test)


def _train(config: str, overrides: list[str], *extra: str
           ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-m", "r1mega.cli", "train", config, *overrides,
                           *extra], capture_output=True, text=True, timeout=900, env=env,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return proc


def _steps(text: str) -> list[str]:
    return [line.split(" | ")[0] for line in text.splitlines() if line.startswith("step ")]


def _plain_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a distributed checkpoint, whole, by key (a one-process group for
    megatron's reader, torn down afterwards)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from r1mega.launch import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        return dist_checkpointing.load_plain_tensors(str(checkpoint))
    finally:
        dist.destroy_process_group()


def test_scaled_r1_zero_671b_recipe_trains_checkpoints_and_resumes(
        recipe_inputs: list[str], tmp_path: Path) -> None:
    save_dir = tmp_path / "ckpt"
    overrides = [*R1_ZERO_671B_SCALED, *recipe_inputs,
                 f"checkpoint.save_dir={save_dir}"]
    check_scaling(overrides)
    assert "precision.fp8=null" in PRECISION_EXCEPTION  # FP8 needs TE on a GPU
    config = "configs/r1_zero_671b.yaml"
    first = _train(config, overrides, "train.steps=3").stdout
    assert "4 process(es)" in first and "TP=2 PP=2 CP=1 EP=2" in first, first
    assert _steps(first) == ["step 1/3", "step 2/3", "step 3/3"], first
    # The length schedule switched at step 3; the reference was reset after it.
    assert "step 3: response budget 16 tokens, sequence length 40" in first, first
    assert "step 3: the reference policy is now the current policy" in first, first
    lengths = [float(m) for m in re.findall(r"\| len ([\d.]+) \|", first)]
    assert max(lengths[:2]) <= 8 and max(lengths[2:]) <= 16, lengths

    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(step_dir(save_dir, 3)))
    assert common["scheduler"]["num_steps"] == 3 * 4  # an optimizer update per minibatch
    assert common["has_reference"]

    second = _train(config, overrides, "train.steps=4").stdout
    assert "(step 3)" in second and _steps(second) == ["step 4/4"], second
    # The resumed run trained against the reference saved at step 3 (the policy after
    # step 3), not the initial weights: it is what step 4's checkpoint holds.
    after_3 = _plain_tensors(step_dir(save_dir, 3))
    after_4 = _plain_tensors(step_dir(save_dir, 4))
    reference = {k[len("reference."):]: v for k, v in after_4.items()
                 if k.startswith("reference.")}
    assert len(reference) > 20
    for key, value in reference.items():
        assert torch.equal(value, after_3[key]), key
    # Not vacuous: the reference is not the initial weights a wrong resume would have
    # used; its routers' expert biases (0 at initialisation) have moved with every update.
    biases = [v for k, v in reference.items() if k.endswith("expert_bias")]
    assert biases and any(float(b.abs().max()) > 0 for b in biases)


def test_scaled_qwen2_5_7b_recipe_trains_checkpoints_and_resumes(
        recipe_inputs: list[str], tmp_path: Path) -> None:
    save_dir = tmp_path / "ckpt"
    overrides = [*QWEN2_5_7B_SCALED, *recipe_inputs, f"checkpoint.save_dir={save_dir}"]
    check_scaling(overrides)
    config = "configs/qwen2_5_7b.yaml"
    first = _train(config, overrides, "train.steps=3").stdout
    assert "TP=2 PP=1" in first and _steps(first) == ["step 1/3", "step 2/3", "step 3/3"]
    second = _train(config, overrides, "train.steps=4").stdout
    assert "(step 3)" in second and _steps(second) == ["step 4/4"], second
