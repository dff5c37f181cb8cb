"""Precision: config checks, the FP8 guards, layer-spec selection, the mapping onto
megatron-core's configs, and block-wise FP8 weight quantization (all on CPU).

The guards are pure functions of an ``Fp8Platform``, so GPUs and Transformer Engine
versions this machine does not have are made up here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from r1mega.config import ConfigError, load_config
from r1mega.config.schema import LayoutConfig, ModelConfig, PrecisionConfig
from r1mega.convert.fp8 import weight_dequant
from r1mega.models import build_transformer_config, fp8_support, specs
from r1mega.models.fp8_blocks import E4M3_MAX, block_quantize
from r1mega.models.fp8_support import Fp8Platform, Fp8Unavailable, check_fp8_supported, fp8_problem
from r1mega.models.precision import (
    check_optimizer_precision_supported,
    generation_precision,
    optimizer_precision_kwargs,
    transformer_precision_kwargs,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY, BIG = CONFIGS / "tiny_cpu.yaml", CONFIGS / "r1_zero_671b.yaml"
QWEN = CONFIGS / "qwen2_5_7b.yaml"

H100 = Fp8Platform(gpu_name="NVIDIA H100 80GB HBM3", compute_capability=(9, 0),
                   cuda_version="12.9", te_version="2.8.0")
A100 = dataclasses.replace(H100, gpu_name="NVIDIA A100-SXM4-80GB", compute_capability=(8, 0))
L40S = dataclasses.replace(H100, gpu_name="NVIDIA L40S", compute_capability=(8, 9))
B200 = dataclasses.replace(H100, gpu_name="NVIDIA B200", compute_capability=(10, 0))
NO_GPU = Fp8Platform(te_error="not tried: no CUDA GPU")


def fp8(recipe: str = "blockwise", fmt: str = "e4m3", **kw) -> PrecisionConfig:
    return PrecisionConfig(params_dtype="bfloat16", fp8=fmt, fp8_recipe=recipe, **kw)


def config_error(path: Path, *overrides: str, world_size: int = 2) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides), world_size=world_size)
    return str(info.value)


# ----------------------------------------------------------------------------- config


def test_shipped_configs_state_their_precision() -> None:
    big = load_config(BIG, world_size=512).precision
    assert (big.fp8, big.fp8_recipe) == ("e4m3", "blockwise")
    # DeepSeek-V3's optimizer: fp32 master weights, bf16 moments.
    assert (big.main_params_dtype, big.exp_avg_dtype, big.exp_avg_sq_dtype) == (
        "float32", "bfloat16", "bfloat16")
    qwen = load_config(QWEN, world_size=8).precision
    assert qwen.fp8 is None and qwen.params_dtype == "bfloat16"
    assert load_config(QWEN, ["precision.fp8=hybrid", "precision.fp8_recipe=tensorwise"],
                       world_size=8).precision.fp8_recipe == "tensorwise"
    for recipe in ("delayed", "tensorwise", "blockwise", "mxfp8"):
        load_config(BIG, [f"precision.fp8_recipe={recipe}"], world_size=512)


@pytest.mark.parametrize(("overrides", "expected"), [
    (["precision.fp8_recipe=block"], "precision.fp8_recipe=block is not one of: delayed, "
                                     "tensorwise, blockwise, mxfp8"),
    (["precision.fp8=e4m3"], "precision.fp8=e4m3 needs Transformer Engine layers but "
                             "model.transformer_impl=local"),
    (["precision.fp8_amax_compute_algo=mean"], "precision.fp8_amax_compute_algo=mean is not "
                                               "one of: max, most_recent"),
    (["precision.fp8_amax_history_len=0"], "precision.fp8_amax_history_len=0 must be >= 1"),
    (["precision.exp_avg_dtype=float8"], "precision.exp_avg_dtype=float8 is not one of: "
                                         "float32, bfloat16"),
    (["precision.exp_avg_dtype=bfloat16", "train.use_distributed_optimizer=false"],
     "precision.exp_avg_dtype=bfloat16 needs train.use_distributed_optimizer=true"),
    (["precision.main_params_dtype=bfloat16"],
     "precision.main_params_dtype=bfloat16 with precision.params_dtype=float32"),
])
def test_precision_config_errors_name_the_keys(overrides: list[str], expected: str) -> None:
    assert expected in config_error(TINY, *overrides)


# ----------------------------------------------------------------------------- guards


@pytest.mark.skipif(torch.cuda.is_available() or specs.te_available(),
                    reason="checks what a machine without a GPU and Transformer Engine reports")
def test_this_cpu_machine_refuses_fp8_with_the_clear_error() -> None:
    platform = fp8_support.probe_fp8_platform()
    assert platform.gpu_name is None and platform.te_version is None
    with pytest.raises(Fp8Unavailable) as info:
        check_fp8_supported(fp8())
    message = str(info.value)
    assert message.startswith("precision.fp8=e4m3 needs Transformer Engine on an FP8-capable GPU")
    assert "no CUDA GPU" in message and "precision.fp8=null" in message
    assert info.value.reason == "needs Transformer Engine on an FP8 GPU (no CUDA GPU here)"
    # The model provider refuses before building anything, with the same error.
    cfg = load_config(QWEN, ["precision.fp8=e4m3"], world_size=8)
    with pytest.raises(RuntimeError, match="precision.fp8=e4m3 needs Transformer Engine"):
        build_transformer_config(cfg.model, cfg.train_layout, cfg.precision)


def test_no_fp8_means_no_checks() -> None:
    for platform in (NO_GPU, A100):
        assert fp8_problem(PrecisionConfig(fp8=None), platform) is None
        assert fp8_problem(None, platform) is None
    check_fp8_supported(PrecisionConfig(fp8=None), "local", platform=NO_GPU)


def test_gpu_without_importable_transformer_engine() -> None:
    platform = dataclasses.replace(H100, te_version=None,
                                   te_error="OSError: libcuda.so.1: cannot open shared object")
    problem = fp8_problem(fp8(), platform)
    assert "needs Transformer Engine on an FP8-capable GPU" in str(problem)
    assert "NVIDIA H100 80GB HBM3 (compute capability 9.0)" in str(problem)
    assert "libcuda.so.1" in str(problem)


@pytest.mark.parametrize(("platform", "recipe", "needed"), [
    (A100, "delayed", "8.9"), (A100, "tensorwise", "8.9"), (A100, "blockwise", "9.0"),
    (L40S, "blockwise", "9.0"), (H100, "mxfp8", "10.0"),
])
def test_gpu_below_the_recipes_compute_capability(platform: Fp8Platform, recipe: str,
                                                  needed: str) -> None:
    problem = fp8_problem(fp8(recipe), platform)
    assert problem is not None
    assert f"needs a GPU of compute capability >= {needed}" in str(problem)
    assert f"precision.fp8_recipe={recipe}" in str(problem)
    assert platform.gpu_name in str(problem)
    assert problem.reason.startswith("needs an FP8 GPU")


@pytest.mark.parametrize(("recipe", "te", "ok"), [
    ("blockwise", "2.2.1", False), ("blockwise", "2.3.0.dev0+5fdd7bb", True),
    ("blockwise", "2.3.0", True), ("tensorwise", "2.1.0", False),
    ("tensorwise", "2.2.0.dev0", True), ("delayed", "1.12.0", True),
])
def test_recipe_needs_a_recent_enough_transformer_engine(recipe: str, te: str, ok: bool) -> None:
    """The TE versions megatron-core 0.19.2's ``get_fp8_recipe`` builds each recipe from."""
    problem = fp8_problem(fp8(recipe), dataclasses.replace(H100, te_version=te))
    if ok:
        assert problem is None
    else:
        minimum = fp8_support.RECIPE_NEEDS[recipe].min_te
        assert f"precision.fp8_recipe={recipe}" in str(problem)
        assert f"needs transformer-engine >= {minimum}" in str(problem) and te in str(problem)


def test_cuda_versions() -> None:
    old_cuda = dataclasses.replace(H100, cuda_version="12.8")
    assert "needs CUDA >= 12.9" in str(fp8_problem(fp8("blockwise"), old_cuda))
    assert fp8_problem(fp8("tensorwise"), old_cuda) is None
    assert "needs CUDA >= 12.1" in str(
        fp8_problem(fp8("delayed"), dataclasses.replace(L40S, cuda_version="12.0")))
    assert fp8_problem(fp8("delayed"), L40S) is None
    assert fp8_problem(fp8("mxfp8"), B200) is None


def test_transformer_engines_own_refusal_is_reported() -> None:
    refuses = dataclasses.replace(B200, te_recipe_support={
        "blockwise": (False, "FP8 block scaled GEMM requires Hopper and CUDA >= 12.9.")})
    problem = fp8_problem(fp8("blockwise"), refuses)
    assert "Transformer Engine 2.8.0 refuses precision.fp8_recipe=blockwise" in str(problem)
    assert "requires Hopper" in str(problem)
    agrees = dataclasses.replace(H100, te_recipe_support={"blockwise": (True, "")})
    assert fp8_problem(fp8("blockwise"), agrees) is None


def test_fp8_needs_transformer_engine_layers() -> None:
    problem = fp8_problem(fp8(), H100, transformer_impl="local")
    assert "model.transformer_impl=local" in str(problem)
    assert fp8_problem(fp8(), H100, transformer_impl="transformer_engine") is None


def test_provider_uses_the_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a (pretend) H100 with TE the FP8 fields reach megatron's TransformerConfig; on
    a pretend A100 the provider refuses with the capability message."""
    import megatron.core.transformer.transformer_config as tc_module

    cfg = load_config(QWEN, ["precision.fp8=e4m3"], world_size=8)
    monkeypatch.setattr(fp8_support, "probe_fp8_platform", lambda: H100)
    tc = build_transformer_config(cfg.model, cfg.train_layout, cfg.precision)
    assert (tc.fp8, tc.fp8_recipe, tc.fp8_param, tc.bf16) == ("e4m3", "blockwise", False, True)
    # MoE + FP8: megatron-core checks the installed TE version itself (none here).
    monkeypatch.setattr(tc_module, "is_te_min_version", lambda *a, **k: True)
    big = load_config(BIG, world_size=512)
    tc = build_transformer_config(big.model, big.train_layout, big.precision)
    assert (tc.fp8, tc.fp8_recipe, tc.num_moe_experts) == ("e4m3", "blockwise", 256)
    # The generation model decodes with bf16 GEMMs.
    gen = build_transformer_config(big.model, big.generation_layout,
                                   generation_precision(big.precision))
    assert gen.fp8 is None and gen.bf16
    monkeypatch.setattr(fp8_support, "probe_fp8_platform", lambda: A100)
    with pytest.raises(Fp8Unavailable, match="compute capability >= 9.0"):
        build_transformer_config(cfg.model, cfg.train_layout, cfg.precision)


# ----------------------------------------------------------------------------- specs


@pytest.mark.parametrize(("te", "impl", "expected"), [
    (True, "auto", True), (False, "auto", False), (True, "local", False),
    (False, "local", False), (True, "transformer_engine", True),
])
def test_spec_selection_follows_the_te_probe(monkeypatch: pytest.MonkeyPatch, te: bool,
                                             impl: str, expected: bool) -> None:
    monkeypatch.setattr(specs, "te_available", lambda: te)
    assert specs.use_transformer_engine(impl) is expected


def test_asking_for_te_without_it_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(specs, "te_available", lambda: False)
    with pytest.raises(RuntimeError, match="model.transformer_impl=transformer_engine"):
        specs.use_transformer_engine("transformer_engine")


def test_block_spec_asks_megatron_for_te_or_local_modules(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """The TE choice reaches megatron's spec builder; only local specs get the CPU
    replacements (SDPA attention, SP-aware norms)."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from parallel.platform import SDPACoreAttention

    seen = []
    original = gpt_layer_specs.get_gpt_decoder_block_spec

    def spy(config, use_transformer_engine, **kwargs):  # noqa: ANN001, ANN202
        seen.append(use_transformer_engine)
        if use_transformer_engine:
            return "te-spec"  # building TE's spec needs TE itself
        return original(config, use_transformer_engine=False, **kwargs)

    monkeypatch.setattr(gpt_layer_specs, "get_gpt_decoder_block_spec", spy)
    model = ModelConfig(arch="llama", num_layers=2, hidden_size=64, ffn_hidden_size=128,
                        num_attention_heads=4, vocab_size=256, transformer_impl="local")
    config = build_transformer_config(OmegaConf.structured(model),
                                      OmegaConf.structured(LayoutConfig()))
    monkeypatch.setattr(specs, "te_available", lambda: True)
    assert specs.decoder_block_spec(config, specs.use_transformer_engine("auto"),
                                   pp_rank=0) == "te-spec"
    local = specs.decoder_block_spec(config, specs.use_transformer_engine("local"), pp_rank=0)
    assert seen == [True, False]
    attention = local.layer_specs[0].submodules.self_attention.submodules.core_attention
    assert attention is SDPACoreAttention and attention is not DotProductAttention


# ----------------------------------------------------------------------------- mapping


def test_transformer_kwargs() -> None:
    assert transformer_precision_kwargs(None) == {
        "params_dtype": torch.float32, "bf16": False, "pipeline_dtype": torch.float32}
    assert transformer_precision_kwargs(PrecisionConfig()) == {
        "params_dtype": torch.bfloat16, "bf16": True, "pipeline_dtype": torch.bfloat16}
    block = transformer_precision_kwargs(fp8("blockwise"))
    assert block == {"params_dtype": torch.bfloat16, "bf16": True,
                     "pipeline_dtype": torch.bfloat16, "fp8": "e4m3", "fp8_recipe": "blockwise",
                     "fp8_wgrad": True, "fp8_param": False, "fp8_dot_product_attention": False,
                     "fp8_multi_head_attention": False}
    delayed = transformer_precision_kwargs(fp8("delayed", "hybrid", fp8_amax_history_len=16,
                                               fp8_amax_compute_algo="most_recent"))
    assert (delayed["fp8"], delayed["fp8_recipe"]) == ("hybrid", "delayed")
    assert (delayed["fp8_amax_history_len"], delayed["fp8_amax_compute_algo"]) == (
        16, "most_recent")
    # Every key is a TransformerConfig field, and megatron accepts the set (dense, no TE).
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    assert set(delayed) <= fields
    made = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, **delayed)
    assert made.fp8_amax_history_len == 16 and made.fp8 == "hybrid"


def test_optimizer_kwargs() -> None:
    from megatron.core.optimizer import OptimizerConfig

    assert optimizer_precision_kwargs(None) == {"bf16": False, "params_dtype": torch.float32}
    plain = optimizer_precision_kwargs(PrecisionConfig())
    assert plain == {"bf16": True, "params_dtype": torch.bfloat16}
    OptimizerConfig(**plain)  # fp32 master weights and moments: no TE needed
    with_fp8 = optimizer_precision_kwargs(fp8("tensorwise"))
    assert with_fp8["fp8_recipe"] == "tensorwise"
    assert "use_precision_aware_optimizer" not in with_fp8
    v3 = optimizer_precision_kwargs(fp8(exp_avg_dtype="bfloat16", exp_avg_sq_dtype="bfloat16"))
    assert v3 == {"bf16": True, "params_dtype": torch.bfloat16, "fp8_recipe": "blockwise",
                  "use_precision_aware_optimizer": True, "main_params_dtype": torch.float32,
                  "exp_avg_dtype": torch.bfloat16, "exp_avg_sq_dtype": torch.bfloat16}
    assert set(v3) <= {f.name for f in dataclasses.fields(OptimizerConfig)}
    bf16_master = optimizer_precision_kwargs(PrecisionConfig(main_params_dtype="bfloat16"))
    assert bf16_master["main_params_dtype"] == torch.bfloat16


def test_narrow_optimizer_state_needs_transformer_engine() -> None:
    narrow = PrecisionConfig(exp_avg_dtype="bfloat16", exp_avg_sq_dtype="bfloat16")
    with pytest.raises(RuntimeError) as info:
        check_optimizer_precision_supported(narrow, te_imports=False)
    assert "precision.exp_avg_dtype=bfloat16, precision.exp_avg_sq_dtype=bfloat16" in str(
        info.value)
    assert "FusedAdam" in str(info.value)
    check_optimizer_precision_supported(narrow, te_imports=True)
    check_optimizer_precision_supported(PrecisionConfig(), te_imports=False)
    check_optimizer_precision_supported(None, te_imports=False)


def test_generation_precision_drops_fp8_only() -> None:
    assert generation_precision(None) is None
    plain = PrecisionConfig()
    assert generation_precision(plain) is plain
    gen = generation_precision(fp8("delayed"))
    assert gen.fp8 is None and gen.params_dtype == "bfloat16"
    as_dictconfig = generation_precision(OmegaConf.structured(fp8()))
    assert as_dictconfig.fp8 is None and as_dictconfig.fp8_recipe == "blockwise"


# ----------------------------------------------------------------------------- fp8 blocks


def _block_scales(scale_inv: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The scale of every element's block, ``shape`` sized."""
    full = scale_inv.repeat_interleave(128, 0).repeat_interleave(128, 1)
    return full[:shape[0], :shape[1]]


@pytest.mark.parametrize("shape", [(256, 384), (300, 200), (5, 130)])
def test_block_quantize_round_trips_through_the_checkpoint_dequantizer(
        shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=g) * 0.02
    weight[1, 3] = 1.5  # an outlier only coarsens its own block
    q, scale_inv = block_quantize(weight)
    assert q.dtype == torch.float8_e4m3fn and q.shape == weight.shape
    rows, cols = -(-shape[0] // 128), -(-shape[1] // 128)
    assert scale_inv.dtype == torch.float32 and scale_inv.shape == (rows, cols)
    # Each block's largest magnitude maps onto E4M3's largest value.
    assert q.float().abs().max() == E4M3_MAX
    back = weight_dequant(q, scale_inv).float()  # bf16, as DeepSeek's reader produces
    err = (back - weight).abs()
    scales = _block_scales(scale_inv, shape)
    # E4M3 keeps 3 mantissa bits: half an ulp is 2^-4 relative for normal values; below
    # 2^-6 (subnormal) the spacing is 2^-9, half of it 2^-10, in units of the block scale.
    # bf16 storage of the result adds 2^-8 relative.
    bound = weight.abs() * (2**-4 + 2**-8) * (1 + 2**-8) + scales * 2**-10 * (1 + 2**-8)
    assert bool((err <= bound).all()), float((err - bound).max())
    assert float(err.norm() / weight.norm()) < 0.04
    # Blocks without the outlier keep their own fine scale.
    if shape[1] > 128:
        assert float(scale_inv[0, 1]) < float(scale_inv[0, 0]) / 10


def test_block_quantize_zero_blocks_and_errors() -> None:
    weight = torch.zeros(130, 260)
    weight[129, 259] = -2.0
    q, scale_inv = block_quantize(weight, block=(128, 128))
    assert torch.equal(weight_dequant(q, scale_inv).float(), weight)
    assert float(scale_inv[1, 2]) == pytest.approx(2.0 / 448)
    with pytest.raises(ValueError, match="2-D"):
        block_quantize(torch.zeros(4, 4, 4))
