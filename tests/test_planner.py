"""The layout planner: parameter counts against hand calculations and published totals,
per-GPU bytes for the shipped 671B layout, the tiny model's weights/grads/optimizer
figures against what megatron-core really allocates, and `r1mega plan` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from r1mega.config import load_config
from r1mega.planner.estimate import kv_bytes_per_token_layer, make_plan
from r1mega.planner.params import count_parameters
from tests.distributed import ROOT, run_torchrun

GiB = 1024**3

# ---------------------------------------------------------------- DeepSeek-V3 by hand
H, V, HEADS = 7168, 129280, 128
Q_A = H * 1536  # q down-projection (q_lora_rank 1536), duplicated over TP
Q_NORM = 1536
Q_B = 1536 * HEADS * (128 + 64)  # q up-projection to 128 heads x (nope 128 + rope 64)
KV_A = H * (512 + 64)  # kv down-projection: latent 512 + shared rope key 64
KV_NORM = 512
KV_B = 512 * HEADS * (128 + 128)  # latent -> per-head k_nope 128 and v 128
OUT_PROJ = HEADS * 128 * H
NORM = H
ATTN = Q_A + Q_NORM + Q_B + KV_A + KV_NORM + KV_B + OUT_PROJ + NORM  # incl. input RMSNorm
DENSE_MLP = 3 * H * 18432
ROUTER = 256 * H
EXPERT = 3 * H * 2048
ROUTED = 256 * EXPERT
SHARED = EXPERT
EMBED = V * H
DENSE_LAYER = ATTN + DENSE_MLP + NORM
MOE_LAYER = ATTN + ROUTER + ROUTED + SHARED + NORM
MAIN = 2 * EMBED + NORM + 3 * DENSE_LAYER + 58 * MOE_LAYER
MTP = MOE_LAYER + 2 * H * H + 3 * NORM  # eh_proj, enorm, hnorm, final norm


def _cfg(path: str, *overrides: str, world: int | None = None):
    return load_config(path, list(overrides), world_size=world)


def test_deepseek_v3_parameter_counts() -> None:
    p = count_parameters(_cfg("configs/r1_zero_671b.yaml").model)
    assert ATTN == 187_114_496 and p.attention_per_layer == ATTN
    assert p.dense_mlp_per_layer == DENSE_MLP == 396_361_728
    assert p.router_per_layer == ROUTER and p.shared_expert_per_layer == SHARED
    assert p.routed_experts_per_layer == ROUTED == 11_274_289_152
    assert p.embedding.total == p.output.total == EMBED == 926_679_040
    assert p.main == MAIN == 671_026_404_352  # "671B total parameters"
    assert p.mtp == MTP
    # The Hugging Face release counts 685B: the MTP module stores its own embedding and
    # head copies (its index also lists FP8 block scales, ~0.04B, not counted here).
    assert p.hf_total == MAIN + MTP + 2 * EMBED
    assert 684e9 < p.hf_total < 686e9
    # "37B activated": all but the 248 idle routed experts of each MoE layer.
    assert p.activated == MAIN - 58 * (256 - 8) * EXPERT
    assert 37e9 < p.activated < 38e9


def test_qwen2_5_7b_parameter_count() -> None:
    h, ffn, kv = 3584, 18944, 4 * 128
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * ffn + 2 * h  # q, k, v (bias), o
    total = 28 * layer + 2 * 152064 * h + h
    p = count_parameters(_cfg("configs/qwen2_5_7b.yaml").model)
    assert p.total == total == 7_615_616_512  # Qwen2.5-7B: 7.61B


def test_671b_layout_bytes_per_gpu() -> None:
    """A middle pipeline stage of the shipped training layout (TP 4, PP 16, EP 32,
    DP 8, expert-DP 1), 4 MoE layers, by hand."""
    cfg = _cfg("configs/r1_zero_671b.yaml", world=512)
    plan = make_plan(cfg, 512, 8, 80)
    tl = plan.train_layout
    assert (tl.tp, tl.pp, tl.ep, tl.dp, tl.expert_dp) == (4, 16, 32, 8, 1)
    stage = plan.stages[1]
    assert list(stage.layers) == [3, 4, 5, 6]
    tp_split = Q_B + KV_B + OUT_PROJ + SHARED  # per layer, split over the 4 TP ranks
    replicated = Q_A + Q_NORM + KV_A + KV_NORM + 2 * NORM + ROUTER
    dense = 4 * (tp_split / 4 + replicated)
    experts = 4 * ROUTED / 32  # 8 of 256 experts per EP rank, 4 layers
    assert stage.dense_params == dense == 283_967_488
    assert stage.expert_params == experts == 1_409_286_144
    assert stage.weights == 2 * (dense + experts)  # bf16
    assert stage.grads == 4 * (dense + experts)  # fp32 main_grad buffers
    # Distributed optimizer: fp32 master + Adam m, v = 12 B/param, over DP 8 (dense) and
    # expert-DP 1 (experts: nothing to shard them over).
    assert stage.optimizer == 12 * dense / 8 + 12 * experts / 1
    assert stage.optimizer / GiB == pytest.approx(16.15, abs=0.01)
    # MLA's KV cache: the 512 latent + 64 rope values per token and layer, bf16.
    assert kv_bytes_per_token_layer(cfg.model, 8) == 2 * (512 + 64)
    g = plan.generation
    # 8,192 rollouts over 64 replicas, decoded 8 at a time (rollout.max_batch_size), at the
    # largest response budget of the length schedule (65,536 + the 1,024 prompt budget).
    assert g.sequences_per_replica == 8 and g.decode_rounds == 8192 // 64 // 8
    # The engine's buffer: every sequence decoded at once at full length, in 64-token
    # blocks, plus megatron's dummy block.
    blocks = 8 * -(-66560 // 64) + 1
    assert g.kv_cache == blocks * 64 * 2 * 576 * 61
    assert plan.fits, plan.problems
    assert plan.worst_stage.total < 80 * GiB and g.total < 80 * GiB


def test_671b_refused_when_it_does_not_fit() -> None:
    cfg = _cfg("configs/r1_zero_671b.yaml", world=512)
    plan = make_plan(cfg, 512, 8, 40)
    assert not plan.fits
    assert any("train_layout" in p and "GiB more than the 40 GiB" in p for p in plan.problems)
    # The TP=1 first guess of the shipped config does not fit 80 GiB: logits on the last
    # stage (33,792 tokens x 129,280 vocab, head + MTP head).
    tp1 = _cfg("configs/r1_zero_671b.yaml", "train_layout.tp=1",
               "train_layout.sequence_parallel=false", world=512)
    problems = make_plan(tp1, 512, 8, 80).problems
    assert any("stage 15" in p and "largest: logits" in p for p in problems), problems


def test_qwen_7b_fits_one_node() -> None:
    plan = make_plan(_cfg("configs/qwen2_5_7b.yaml", world=8), 8, 8, 80)
    assert plan.fits, plan.problems


# ------------------------------------------------------ tiny model: planner vs megatron
WORKER = textwrap.dedent('''
    """Build the tiny policy + optimizer and count the bytes megatron-core allocates."""
    import json
    import sys

    import torch.distributed as dist

    from parallel.layout import Layout, init_distributed, initialize_layout
    from parallel.platform import manual_seed
    from r1mega.config import load_config
    from r1mega.training.optim import build_optimizer
    from r1mega.training.policy import build_policy


    def add(seen, counted, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            counted.append(storage.nbytes())


    def measure(overrides):
        world = dist.get_world_size()
        cfg = load_config("configs/tiny_cpu.yaml", overrides, world_size=world)
        initialize_layout(Layout.from_config(cfg.train_layout, world))
        manual_seed(1)
        policy = build_policy(cfg.model, cfg.train_layout, cfg.precision, None,
                              use_distributed_optimizer=True)
        optimizer = build_optimizer(policy, cfg.train, cfg.precision)
        policy.zero_grad()
        optimizer.step()  # Adam creates its moments on the first step
        seen, weights, grads, optim = set(), [], [], []
        for chunk in policy.chunks:
            buffers = list(chunk.buffers) + list(chunk.expert_parallel_buffers)
            for buf in buffers:
                if buf.param_data is not None:
                    add(seen, weights, buf.param_data)
            for param in chunk.module.parameters():
                add(seen, weights, param)
            for buf in buffers:
                add(seen, grads, buf.grad_data)
        for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
            for group in sub.optimizer.param_groups:
                for param in group["params"]:
                    add(seen, optim, param)  # fp32 master shards (bf16 params only)
            for state in sub.optimizer.state.values():
                for value in state.values():
                    if hasattr(value, "untyped_storage"):
                        add(seen, optim, value)
        return {"weights": sum(weights), "grads": sum(grads), "optimizer": sum(optim)}


    init_distributed()
    cases = json.loads(sys.argv[2])
    result = {name: measure(overrides) for name, overrides in cases.items()}
    with open(f"{sys.argv[1]}.{dist.get_rank()}", "w") as f:
        json.dump(result, f)
''')

SINGLE_STAGE = ["train_layout.pp=1", "train_layout.pp_layers=null"]
CASES = {
    # fp32 params: no master copy; DP 2 shards Adam's moments of every parameter.
    "fp32_dp2": SINGLE_STAGE,
    # bf16 params: fp32 master + moments; EP 2 splits the experts, expert-DP is 1.
    "bf16_ep2": [*SINGLE_STAGE, "precision.params_dtype=bfloat16", "train_layout.ep=2"],
}


def test_tiny_planner_matches_allocated_memory(tmp_path: Path) -> None:
    script = tmp_path / "memory_worker.py"
    script.write_text(WORKER)
    out = tmp_path / "memory.json"
    run_torchrun(2, script, out, json.dumps(CASES))
    for rank in range(2):
        measured = json.loads(Path(f"{out}.{rank}").read_text())
        for name, overrides in CASES.items():
            stage = make_plan(_cfg("configs/tiny_cpu.yaml", *overrides, world=2), 2, 2,
                              80).stages[0]
            planned = {"weights": stage.weights, "grads": stage.grads,
                       "optimizer": stage.optimizer}
            for key, value in planned.items():
                assert measured[name][key] == pytest.approx(value, rel=0.03), (
                    name, rank, key, measured[name], planned)


# ------------------------------------------------------------------------- the command
def _plan(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "r1mega.cli", "plan", *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_plan_command_671b_fits_80gib() -> None:
    out = _plan("configs/r1_zero_671b.yaml")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for needle in ("512 GPUs, 80 GiB", "671.03B main", "37.55B activated",
                   "Training layout: TP=4 PP=16", "Generation layout: TP=8", "KV cache",
                   "Resharding", "Step time", "MFU 20% of 1979 TFLOP/s (fp8)", "fits:"):
        assert needle in text, (needle, text)


def test_plan_command_refuses_what_does_not_fit() -> None:
    out = _plan("configs/r1_zero_671b.yaml", "--gpu-mem-gib", "8")
    assert out.returncode == 1
    assert "does not fit" in out.stderr
    assert "more than the 8 GiB available" in out.stderr
    assert "generation_layout" in out.stderr and "train_layout" in out.stderr
