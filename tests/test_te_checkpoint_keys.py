"""Checkpoints written with megatron's local layer specs load into models built with its
Transformer Engine specs (what GPU clusters run), and compute the same thing there.

TE does not import on a CPU machine, so megatron-core's own TE spec builders
(``get_gpt_layer_with_transformer_engine_submodules``, the TE MTP spec, ``TENorm`` for the
final norm) are run with a stand-in backend: every leaf module has the parameter names
and checkpoint sharding of its TE counterpart (TE's ``LayerNormColumnParallelLinear``
holds ``weight`` and ``layer_norm_weight`` and normalises its input before the GEMM) but
computes with megatron's local modules. The module tree, and therefore every checkpoint
key, is the one megatron builds for TE. Grouped-GEMM experts (``TEGroupedMLP``) are not
covered: megatron-core saves them under ``SequentialMLP``'s keys by design.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

importlib.import_module("torch.utils._device")._device_constructors()

from r1mega.convert import model_config_from_hf  # noqa: E402
from tests.hf_models import hf_config  # noqa: E402

ARCHS = ["llama", "qwen2", "deepseek_v3"]


def _stand_in_te_backend() -> tuple[type, type]:
    """(spec provider, final-norm class) standing in for TE's."""
    import torch.nn.functional as F
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    from parallel.platform import (
        SDPACoreAttention,
        SequenceParallelRMSNorm,
        duplicated_linear_class,
    )

    class LayerNormColumnParallelLinear(ColumnParallelLinear):
        """TE's fused norm + column-parallel GEMM: RMSNorm with ``layer_norm_weight``."""

        def __init__(self, input_size: int, output_size: int, *, config: Any,
                     **kwargs: Any) -> None:
            super().__init__(input_size, output_size, config=config, **kwargs)
            self.eps = config.layernorm_epsilon
            self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size))

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            x = F.rms_norm(x, (x.shape[-1],), self.layer_norm_weight, self.eps)
            return super().forward(x, *args, **kwargs)

    class StandInTESpecProvider(LocalSpecProvider):
        def fuse_layernorm_and_linear(self) -> bool:
            return True

        def column_parallel_layer_norm_linear(self) -> type:
            return LayerNormColumnParallelLinear

        def linear(self) -> type:
            return duplicated_linear_class()

        def layer_norm(self, rms_norm: bool = False, for_qk: bool = False,
                       has_residual: bool = False) -> type:
            return SequenceParallelRMSNorm

        def core_attention(self) -> type:
            return SDPACoreAttention

    return StandInTESpecProvider, SequenceParallelRMSNorm


@contextlib.contextmanager
def transformer_engine_specs(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Models built inside use megatron's TE specs (with stand-in leaves)."""
    from megatron.core.extensions import transformer_engine_spec_provider
    from megatron.core.models.gpt import gpt_layer_specs

    from r1mega.models import specs

    provider, norm = _stand_in_te_backend()
    with monkeypatch.context() as m:
        m.setattr(gpt_layer_specs, "TESpecProvider", provider)
        m.setattr(gpt_layer_specs, "TENorm", norm)
        # megatron resolves MLA's default norm modules through get_backend("transformer_engine").
        m.setattr(transformer_engine_spec_provider, "TESpecProvider", provider)
        m.setattr(specs, "te_available", lambda: True)
        yield


def _model_cfg(arch: str) -> Any:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = hf_config(arch).to_dict()  # a config built in memory names no architecture
    architecture = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config["model_type"]]
    return model_config_from_hf({**config, "architectures": [architecture]})


def _stored_keys(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    from r1mega.convert.megatron_layout import layout_of

    return {k: shape for k, (shape, _) in layout_of(model).global_keys().items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_local_and_te_models_store_the_same_checkpoint_keys(
        arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from r1mega.convert.megatron_layout import build_meta_model, single_process_groups

    cfg = _model_cfg(arch)
    with single_process_groups():
        local = _stored_keys(build_meta_model(cfg, "float32"))
        with transformer_engine_specs(monkeypatch):
            te_model = build_meta_model(cfg, "float32", transformer_impl="auto")
        te = _stored_keys(te_model)
    # The TE tree really is a different module tree (else the test would prove nothing).
    assert any(name.endswith("layer_norm_weight") for name, _ in te_model.named_parameters())
    assert not set(local) ^ set(te), (f"only local: {sorted(set(local) - set(te))}; "
                                      f"only TE: {sorted(set(te) - set(local))}")
    assert local == te


def _perturb_norms(model: torch.nn.Module) -> None:
    """Norm weights away from one, different per tensor, so a mis-mapped norm shows."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))


def _logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, attention_mask=None)


@pytest.mark.parametrize("arch", ["llama", "deepseek_v3"])
def test_checkpoint_saved_by_local_model_loads_into_te_model(
        arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same logits after the round trip local -> dist checkpoint -> TE module tree."""
    from parallel.layout import Layout
    from r1mega.checkpointing.model_io import load_model, save_model
    from r1mega.config.schema import PrecisionConfig
    from r1mega.convert.megatron_layout import single_process_groups
    from r1mega.models import build_model

    cfg = _model_cfg(arch)
    precision = PrecisionConfig(params_dtype="float32")
    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with single_process_groups():
        torch.manual_seed(0)
        local = build_model(cfg, Layout(world_size=1), precision).eval()
        _perturb_norms(local)
        save_model([local], str(tmp_path / "ckpt"))
        with transformer_engine_specs(monkeypatch):
            torch.manual_seed(1)  # different init: only the checkpoint can make them agree
            te_model = build_model(cfg, Layout(world_size=1), precision).eval()
        fused = [n for n, _ in te_model.named_parameters() if n.endswith("layer_norm_weight")]
        assert fused
        before = _logits(te_model, tokens)
        load_model([te_model], str(tmp_path / "ckpt"))
        want, got = _logits(local, tokens), _logits(te_model, tokens)
    assert not torch.allclose(before, want, atol=1e-3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
