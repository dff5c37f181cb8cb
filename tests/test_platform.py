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


# --------------------------------------------------------------- dynamic inference


def _scatter_into_blocks(buffer: torch.Tensor, seq: torch.Tensor, blocks: list[int]) -> None:
    block = buffer.shape[1]
    for j, b in enumerate(blocks):
        part = seq[j * block:(j + 1) * block]
        buffer[b, :part.shape[0]] = part


def _explicit_attention(q, k, v, scale):  # q [n, h, d], k/v [L, hk, d]; bottom-right causal
    n, length = q.shape[0], k.shape[0]
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    blocked = torch.arange(length)[None, :] > (length - n + torch.arange(n))[:, None]
    scores = scores.masked_fill(blocked, -math.inf)
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def test_paged_attention_matches_attention_over_contiguous_keys() -> None:
    """Requests mid-prefill (several new queries) and decoding (one), keys scattered over
    non-contiguous blocks of a buffer whose unused slots hold NaN, a padding request
    (no keys) and trailing padding rows: the paged result equals explicit attention."""
    from parallel.platform import paged_attention

    g = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, block = 4, 2, 8, 4
    totals, new = [7, 3, 10], [3, 1, 1]  # keys per request, new queries per request
    tables = [[5, 1], [3], [0, 6, 2]]
    k_buf = torch.full((8, block, kv_heads, dim), math.nan)
    v_buf = torch.full((8, block, kv_heads, dim), math.nan)
    keys = [torch.randn(n, kv_heads, dim, generator=g) for n in totals]
    values = [torch.randn(n, kv_heads, dim, generator=g) for n in totals]
    for k, v, table in zip(keys, values, tables, strict=True):
        _scatter_into_blocks(k_buf, k, table)
        _scatter_into_blocks(v_buf, v, table)
    queries = [torch.randn(n, heads, dim, generator=g) for n in new]
    q = torch.cat([*queries, torch.randn(2, heads, dim, generator=g)])  # 2 padding rows
    cu = torch.tensor([0, 3, 4, 5, 5])  # the 4th request is padding
    seqlens = torch.tensor(totals + [0])
    table = torch.full((4, 3), -1, dtype=torch.int32)
    for i, t in enumerate(tables):
        table[i, :len(t)] = torch.tensor(t)
    out = paged_attention(q, k_buf, v_buf, cu, seqlens, table, scale=0.3)
    for i in range(3):
        ref = _explicit_attention(queries[i], keys[i], values[i], 0.3)
        torch.testing.assert_close(out[cu[i]:cu[i + 1]], ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[5:], torch.zeros(2, heads, dim))


def test_paged_attention_absorbed_mla_decode_reads_values_from_the_latent() -> None:
    from parallel.platform import paged_attention

    g = torch.Generator().manual_seed(1)
    heads, latent, rope, block, length = 3, 6, 2, 4, 6
    cache = torch.randn(length, latent + rope, generator=g)
    buffer = torch.full((4, block, latent + rope), math.nan)
    _scatter_into_blocks(buffer, cache, [2, 0])
    q = torch.randn(1, heads, latent + rope, generator=g)
    out = paged_attention(q, buffer, None, torch.tensor([0, 1]), torch.tensor([length]),
                          torch.tensor([[2, 0]], dtype=torch.int32), scale=0.5,
                          latent_rank=latent)
    ref = _explicit_attention(q, cache[:, None], cache[:, None, :latent], 0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


class _FusedNormLinear(torch.nn.Module):
    """Stand-in for TE's LayerNormColumnParallelLinear (norm fused into the linear)."""

    def __init__(self, rank: int, out: int, g: torch.Generator) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(out, rank, generator=g))
        self.layer_norm_weight = torch.nn.Parameter(1 + 0.1 * torch.randn(rank, generator=g))
        self.eps, self.normalization, self.zero_centered_gamma = 1e-6, "RMSNorm", False
        self.tp_group = None


def _te_like_split(fused, config, _, tp_group):
    """What TE's split_te_layernorm_column_parallel_linear does: new modules holding
    *copies* of the fused weights."""
    norm = torch.nn.RMSNorm(fused.weight.shape[1], eps=fused.eps)
    linear = torch.nn.Linear(fused.weight.shape[1], fused.weight.shape[0], bias=False)
    with torch.no_grad():
        norm.weight.copy_(fused.layer_norm_weight)
        linear.weight.copy_(fused.weight)
    return norm, lambda x: (linear(x), None)


def _fake_mla(g: torch.Generator) -> torch.nn.Module:
    from megatron.core.transformer.identity_op import IdentityOp

    heads, qk, v, rank = 2, 3, 4, 5
    mla = torch.nn.Module()
    mla.config = SimpleNamespace(qk_head_dim=qk, v_head_dim=v, kv_lora_rank=rank,
                                 layernorm_epsilon=1e-6, layernorm_zero_centered_gamma=False,
                                 normalization="RMSNorm")
    mla.num_attention_heads_per_partition = heads
    mla.linear_kv_up_proj = _FusedNormLinear(rank, heads * (qk + v), g)
    mla.kv_layernorm = IdentityOp()
    return mla


def _absorption_is_live(mla: torch.nn.Module, fused: torch.nn.Module) -> bool:
    """Whether everything MLA's latent path reads reflects ``fused``'s current weights."""
    x = torch.randn(7, fused.weight.shape[1], generator=torch.Generator().manual_seed(9))
    normed = torch.nn.functional.rms_norm(x, (x.shape[-1],), fused.layer_norm_weight, fused.eps)
    up = fused.weight.view(2, 7, 5)
    checks = [torch.allclose(mla.kv_layernorm(x), normed, atol=1e-6),
              torch.allclose(mla.linear_kv_up_proj_linear(x)[0], x @ fused.weight.T, atol=1e-6),
              torch.equal(mla.up_k_weight, up[:, :3]), torch.equal(mla.up_v_weight, up[:, 3:])]
    return all(checks)


def test_mla_absorption_follows_a_refit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Upstream defect (b): megatron-core 0.19.2 splits TE's fused kv up projection into
    copies once and deletes it, so weights written by name afterwards (a refit) never
    reach the latent path. The fix reads the live weights; checked on a TE-like layout."""
    from megatron.core.transformer import multi_latent_attention

    from parallel.upstream_fixes import UPSTREAM, apply_upstream_fixes, prepare_for_absorption_live

    apply_upstream_fixes()
    monkeypatch.setattr(multi_latent_attention, "split_te_layernorm_column_parallel_linear",
                        _te_like_split)
    g = torch.Generator().manual_seed(3)

    def refit(fused):  # what resharding does: new values written into the same tensors
        with torch.no_grad():
            fused.weight.copy_(torch.randn(fused.weight.shape, generator=g))
            fused.layer_norm_weight.copy_(1 + 0.1 * torch.randn(5, generator=g))

    upstream = _fake_mla(g)
    fused = upstream.linear_kv_up_proj
    UPSTREAM["MLASelfAttention.prepare_for_absorption"](upstream)
    assert _absorption_is_live(upstream, fused)
    refit(fused)
    UPSTREAM["MLASelfAttention.prepare_for_absorption"](upstream)  # every forward calls it
    assert not _absorption_is_live(upstream, fused)  # the defect

    fixed = _fake_mla(g)
    fused = fixed.linear_kv_up_proj
    prepare_for_absorption_live(fixed)
    refit(fused)
    prepare_for_absorption_live(fixed)
    assert _absorption_is_live(fixed, fused)
    assert fixed.linear_kv_up_proj is fused  # nothing deleted: refit still finds it by name
    assert [n for n, _ in fixed.named_parameters()] == [
        "linear_kv_up_proj.weight", "linear_kv_up_proj.layer_norm_weight"]
