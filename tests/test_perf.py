"""Performance arithmetic against hand calculations: model FLOPs per token (dense GQA and
MLA + MoE + MTP), MFU, the device table, and the decode roofline's byte counts."""

from __future__ import annotations

import pytest
import torch

from r1mega.config.schema import ModelConfig
from r1mega.perf.devices import lookup_device, measure_copy_bandwidth, measure_matmul_flops
from r1mega.perf.flops import forward_flops_per_token, model_flops_utilization
from r1mega.perf.roofline import (
    WeightBytes,
    decode_step_bytes,
    expected_experts_touched,
    model_weight_bytes,
    roofline_tokens_per_s,
)
from r1mega.planner.params import count_parameters

DENSE = ModelConfig(arch="llama", num_layers=2, hidden_size=64, ffn_hidden_size=256,
                    num_attention_heads=4, num_query_groups=2, vocab_size=256)
MOE = ModelConfig(arch="deepseek_v3", num_layers=3, first_k_dense_layers=1, hidden_size=32,
                  ffn_hidden_size=64, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=8,
                  qk_head_dim=8, qk_pos_emb_head_dim=4, v_head_dim=8, num_experts=4,
                  moe_ffn_hidden_size=16, moe_topk=2, moe_shared_expert_intermediate_size=16,
                  mtp_num_layers=1, vocab_size=100)


def test_dense_gqa_flops_by_hand() -> None:
    f = forward_flops_per_token(DENSE, seq_length=64)
    h, a, g, d, ff, v, layers = 64, 4, 2, 16, 256, 256, 2
    assert f.attention_projections == layers * 2 * (h * a * d + 2 * h * g * d + a * d * h)
    assert f.attention_projections == 49152
    # A query at position i sees i + 1 keys: the mean over 64 positions is 32.5.
    assert f.attention_scores == layers * 2 * a * (d + d) * 32.5 == 16640
    assert f.mlp == layers * 2 * 3 * h * ff == 196608
    assert f.output_head == 2 * h * v == 32768
    assert f.mtp == 0
    assert f.forward == 295168 and f.training == 3 * 295168
    full = forward_flops_per_token(DENSE, seq_length=64, causal=False)
    assert full.attention_scores == layers * 2 * a * 2 * d * 64


def test_mla_moe_mtp_flops_by_hand() -> None:
    f = forward_flops_per_token(MOE, seq_length=10)
    # MLA per layer: q = 32*16 + 16*2*(8+4); kv = 32*(8+4) + 8*2*(8+8); out = 2*8*32.
    projections = 2 * ((32 * 16 + 16 * 2 * 12) + (32 * 12 + 8 * 2 * 16) + 2 * 8 * 32)
    assert projections == 4096
    assert f.attention_projections == 3 * 4096
    scores = 2 * 2 * (8 + 4 + 8) * 5.5  # mean of 1..10 keys = 5.5
    assert f.attention_scores == 3 * scores == 1320
    dense_mlp = 2 * 3 * 32 * 64
    # Router over 4 experts + only the top-2 routed experts + the shared expert.
    moe_mlp = 2 * (32 * 4 + 2 * 3 * 32 * 16 + 3 * 32 * 16)
    assert (dense_mlp, moe_mlp) == (12288, 9472)
    assert f.mlp == dense_mlp + 2 * moe_mlp
    head = 2 * 32 * 100
    assert f.output_head == head
    # MTP: eh_proj (2h -> h) + one MoE layer (the last layer's kind) + the head again.
    assert f.mtp == 2 * 2 * 32 * 32 + projections + scores + moe_mlp + head == 24504
    assert f.forward == 12288 + 1320 + 31232 + 6400 + 24504 == 75744
    no_q_lora = forward_flops_per_token(ModelConfig(**{**MOE.__dict__, "q_lora_rank": None}), 10)
    assert no_q_lora.attention_projections == 3 * 2 * (
        32 * 2 * 12 + (32 * 12 + 8 * 2 * 16) + 2 * 8 * 32)


@pytest.mark.parametrize("model", [DENSE, ModelConfig(**{**MOE.__dict__, "mtp_num_layers": 0})])
def test_gemm_flops_agree_with_the_parameter_count(model: ModelConfig) -> None:
    """Outside attention scores, forward FLOPs are 2 x the activated GEMM weights: the
    planner's activated parameters minus the embedding lookup and the norm weights."""
    params = count_parameters(model)
    norms = model.num_layers * 2 * model.hidden_size + model.hidden_size
    if model.arch == "deepseek_v3":
        norms += model.num_layers * (model.q_lora_rank + model.kv_lora_rank)
    gemm = params.activated - params.embedding.total - norms
    f = forward_flops_per_token(model, seq_length=128)
    assert f.forward - f.attention_scores == 2 * gemm


def test_mfu() -> None:
    assert model_flops_utilization(1000, 1e9, 1e13) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        model_flops_utilization(1000, 1e9, 0)
    with pytest.raises(ValueError):
        forward_flops_per_token(DENSE, 0)


@pytest.mark.parametrize(("name", "spec", "hbm"), [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 3350), ("NVIDIA H100 PCIe", "H100 PCIe", 2000),
    ("NVIDIA H100 NVL", "H100 NVL", 3900), ("NVIDIA H200", "H200", 4800),
    ("NVIDIA GH200 480GB", "GH200 (H100 96GB HBM3)", 4000), ("NVIDIA H20", "H20", 4000),
    ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB", 2039),
    ("NVIDIA A100 80GB PCIe", "A100 PCIe 80GB", 1935),
    ("NVIDIA A100-SXM4-40GB", "A100 40GB", 1555),
])
def test_device_table(name: str, spec: str, hbm: float) -> None:
    found = lookup_device(name)
    assert found is not None and found.name == spec and found.hbm_gbs == hbm
    assert found.hbm_bytes_per_s == hbm * 1e9


def test_device_peaks_and_measurements() -> None:
    h100 = lookup_device("NVIDIA H100 80GB HBM3")
    assert (h100.peak_flops(False), h100.peak_flops(True)) == (989e12, 1979e12)
    with pytest.raises(ValueError, match="no FP8"):
        lookup_device("NVIDIA A100-SXM4-80GB").peak_flops(True)
    assert lookup_device("Tesla T4") is None
    assert measure_copy_bandwidth("cpu", megabytes=4, repeats=2) > 0
    assert measure_matmul_flops("cpu", size=64, repeats=2) > 0


def test_experts_touched() -> None:
    assert expected_experts_touched(8, 2, 1) == pytest.approx(2)
    assert expected_experts_touched(8, 2, 0) == 0
    assert expected_experts_touched(4, 2, 2) == pytest.approx(4 * (1 - 0.5**2))
    assert expected_experts_touched(64, 6, 1000) == pytest.approx(64)
    with pytest.raises(ValueError):
        expected_experts_touched(4, 5, 1)


def test_decode_step_bytes_by_hand() -> None:
    weights = WeightBytes(dense=1000, embedding_row=10, experts={1: 800, 2: 800})
    step = decode_step_bytes(weights, num_experts=4, topk=2, batch=2, kv_bytes_per_token=24,
                             mean_context=50)
    # 2 tokens x top-2 of 4 experts touch 4 * (1 - (1/2)^2) = 3 of 4 experts per layer.
    assert step.weights == 1000 + 2 * 10 + 0.75 * 1600
    assert step.kv_cache == 2 * 50 * 24
    assert step.total == 4620
    assert roofline_tokens_per_s(2, 4620, 4.62e6) == pytest.approx(2000)
    dense = decode_step_bytes(WeightBytes(1000, 0, {}), None, None, 4, 10, 5)
    assert dense.total == 1000 + 4 * 5 * 10
    with pytest.raises(ValueError):
        decode_step_bytes(weights, None, None, 1, 1, 1)


def _module_with(params: dict[str, tuple[int, ...]]) -> torch.nn.Module:
    root = torch.nn.Module()
    for name, shape in params.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(torch.zeros(shape)))
    return root


def test_model_weight_bytes_classifies_megatron_names() -> None:
    model = _module_with({
        "embedding.word_embeddings.weight": (10, 4),
        "decoder.layers.0.mlp.linear_fc1.weight": (8, 4),
        "decoder.layers.1.mlp.router.weight": (2, 4),
        "decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight": (6, 4),
        "decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight": (6, 4),
        "decoder.layers.2.mlp.experts.linear_fc1.weight0": (6, 4),
        "output_layer.weight": (10, 4),
    })
    untied = model_weight_bytes(model, tied_embedding=False)
    assert untied.dense == 4 * 4 * (8 + 2 + 10)
    assert untied.embedding_row == 4 * 4
    assert untied.experts == {1: 2 * 6 * 4 * 4, 2: 6 * 4 * 4}
    tied = model_weight_bytes(model, tied_embedding=True)
    assert tied.dense == 4 * 4 * (10 + 8 + 2 + 10) and tied.embedding_row == 0
