"""The CPU platform layer and the TE guard, checked against plain-PyTorch references."""

from __future__ import annotations

import importlib.abc
import math
import sys
from types import SimpleNamespace

import pytest
import torch

from parallel.platform import SDPACoreAttention, apply_cpu_platform


def _config(heads: int, groups: int, dim: int) -> SimpleNamespace:
    return SimpleNamespace(context_parallel_size=1, num_attention_heads=heads,
                           num_query_groups=groups, kv_channels=dim, attention_dropout=0.0)


def _reference_attention(q, k, v, scale):  # [s, b, h, d] inputs, explicit softmax
    s = q.shape[0]
    rep = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) * scale
    scores = scores.masked_fill(torch.triu(torch.ones(s, s, dtype=torch.bool), 1), -math.inf)
    out = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), v)
    return out.reshape(s, q.shape[1], -1)


def test_sdpa_attention_matches_explicit_softmax_with_gqa_and_mla_dims() -> None:
    from megatron.core.transformer.enums import AttnMaskType

    torch.manual_seed(0)
    heads, groups, qk_dim, v_dim = 4, 2, 24, 16  # MLA-like: q/k dim != v dim
    attn = SDPACoreAttention(_config(heads, groups, qk_dim), 1, AttnMaskType.causal, "self",
                             softmax_scale=0.3, k_channels=qk_dim, v_channels=v_dim)
    q = torch.randn(7, 2, heads, qk_dim)
    k = torch.randn(7, 2, groups, qk_dim)
    v = torch.randn(7, 2, groups, v_dim)
    out = attn(q, k, v, attention_mask=None)
    torch.testing.assert_close(out, _reference_attention(q, k, v, 0.3), rtol=1e-5, atol=1e-6)


def test_sdpa_attention_packed_sequences_attend_within_each_sequence() -> None:
    from megatron.core.transformer.enums import AttnMaskType

    torch.manual_seed(1)
    attn = SDPACoreAttention(_config(2, 2, 8), 1, AttnMaskType.causal, "self")
    lengths = [3, 5]
    q, k, v = (torch.randn(sum(lengths), 2, 8) for _ in range(3))
    packed = SimpleNamespace(cu_seqlens_q=torch.tensor([0, 3, 8]))
    out = attn(q, k, v, attention_mask=None, packed_seq_params=packed)
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        ref = _reference_attention(q[sl, None], k[sl, None], v[sl, None], 1 / math.sqrt(8))
        torch.testing.assert_close(out[sl], ref[:, 0], rtol=1e-5, atol=1e-6)
        start += n


def test_cpu_platform_maps_cuda_factories_and_is_idempotent() -> None:
    assert apply_cpu_platform() is True
    assert apply_cpu_platform() is True
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.tensor([1.0], device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.cuda.current_device() == "cpu"
    assert torch.ones(1).cuda().device.type == "cpu"
    with torch.device("meta"):  # the wrapped factories still honour the device context
        assert torch.zeros(2).device.type == "meta"


class _BrokenTE(importlib.abc.MetaPathFinder):
    """Makes `import transformer_engine` fail the way it does without a driver."""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001
        if name.split(".")[0] == "transformer_engine":
            raise OSError("libcuda.so.1: cannot open shared object file")
        return None


def test_te_guard_survives_a_broken_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from r1mega.models import specs

    specs.te_available.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for mod in [m for m in sys.modules if m.startswith("transformer_engine")]:
        monkeypatch.delitem(sys.modules, mod)
    finder = _BrokenTE()
    sys.meta_path.insert(0, finder)
    try:
        assert specs.te_available() is False
        assert specs.use_transformer_engine("auto") is False
        with pytest.raises(RuntimeError, match="model.transformer_impl=transformer_engine"):
            specs.use_transformer_engine("transformer_engine")
    finally:
        sys.meta_path.remove(finder)
        specs.te_available.cache_clear()


def test_transformer_impl_must_be_known() -> None:
    from r1mega.models.specs import use_transformer_engine

    with pytest.raises(ValueError, match="model.transformer_impl='fast'"):
        use_transformer_engine("fast")
    assert use_transformer_engine("local") is False
