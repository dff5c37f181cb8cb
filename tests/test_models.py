"""Model providers: the shipped configs translate into valid megatron-core configs, and
the launcher environments are read correctly."""

from __future__ import annotations

import pytest

from parallel.layout import Layout, detect_distributed_env
from r1mega.config import load_config
from r1mega.models import build_transformer_config

CONFIGS = [("configs/tiny_cpu.yaml", 2), ("configs/r1_zero_tiny_cpu.yaml", 2),
           ("configs/r1_zero_671b.yaml", 512),
           ("configs/qwen2_5_7b.yaml", 8)]


@pytest.mark.parametrize(("path", "world"), CONFIGS)
def test_shipped_configs_build_megatron_configs(path: str, world: int) -> None:
    """megatron-core's own TransformerConfig checks accept every shipped model+layout."""
    cfg = load_config(path, ["precision.fp8=null"], world_size=world)  # FP8 needs TE + GPU
    for layout_cfg in (cfg.train_layout, cfg.generation_layout):
        tc = build_transformer_config(cfg.model, layout_cfg, cfg.precision)
        assert tc.num_layers == cfg.model.num_layers
        assert tc.tensor_model_parallel_size == layout_cfg.tp
        assert tc.expert_model_parallel_size == layout_cfg.ep


def test_deepseek_v3_671b_shape() -> None:
    cfg = load_config("configs/r1_zero_671b.yaml", ["precision.fp8=null"], world_size=512)
    tc = build_transformer_config(cfg.model, cfg.train_layout, cfg.precision)
    assert (tc.num_layers, tc.hidden_size, tc.num_attention_heads) == (61, 7168, 128)
    assert (tc.num_moe_experts, tc.moe_router_topk) == (256, 8)
    assert tc.moe_layer_freq == [0, 0, 0] + [1] * 58  # first 3 layers dense
    assert (tc.q_lora_rank, tc.kv_lora_rank) == (1536, 512)
    assert (tc.qk_head_dim, tc.qk_pos_emb_head_dim, tc.v_head_dim) == (128, 64, 128)
    assert tc.moe_router_score_function == "sigmoid" and tc.moe_router_enable_expert_bias
    assert tc.moe_router_topk_scaling_factor == 2.5
    assert (tc.moe_router_num_groups, tc.moe_router_group_topk) == (8, 4)
    assert tc.mtp_num_layers == 1
    assert cfg.model.vocab_size == 129280


def test_dense_qwen_shape() -> None:
    cfg = load_config("configs/qwen2_5_7b.yaml", world_size=8)
    tc = build_transformer_config(cfg.model, cfg.train_layout, cfg.precision)
    assert tc.num_query_groups == 4 and tc.add_qkv_bias and tc.gated_linear_unit
    assert tc.normalization == "RMSNorm"


def test_srun_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")
    monkeypatch.setenv("MASTER_PORT", "6000")
    env = detect_distributed_env()
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (5, 16, 1, "slurm")
    assert (env.master_addr, env.master_port) == ("10.0.0.7", 6000)
    monkeypatch.delenv("MASTER_ADDR")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        detect_distributed_env()


def test_layout_refuses_world_sizes_it_cannot_tile() -> None:
    from r1mega.config.schema import LayoutConfig

    with pytest.raises(ValueError, match=r"train_layout: world size 6 .* tp\*pp\*cp = 2\*2\*1 = 4"):
        Layout.from_config(LayoutConfig(tp=2, pp=2), 6, name="train_layout")
    layout = Layout.from_config(LayoutConfig(tp=2, pp=2, ep=2), 8)
    assert (layout.dp, layout.expert_dp) == (2, 2)


def test_fp8_without_transformer_engine_is_a_clear_error() -> None:
    cfg = load_config("configs/r1_zero_671b.yaml", world_size=512)
    assert cfg.precision.fp8 == "e4m3"
    with pytest.raises(RuntimeError, match="precision.fp8=e4m3 needs Transformer Engine"):
        build_transformer_config(cfg.model, cfg.train_layout, cfg.precision)
