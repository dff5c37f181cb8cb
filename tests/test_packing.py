"""Padding-free (THD-packed) microbatches: layout, round trip, and model equivalence.

The layout tests pin what the packed forward relies on (segment boundaries, positions
restarting per sequence, masks, the dummy padding segment, extras). The model tests run
the tiny dense and DeepSeek-V3 (MLA, MoE, MTP) models of ``tests/workers/common.py``
padded and packed through megatron-core's schedule, in fp32, at TP=1 and at TP=2
(DeepSeek-V3 then runs sequence parallel): response-token log-probabilities must agree
to 1e-5 and the finalized gradients of their sum must agree too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from r1mega.training.packing import (
    pack_microbatch,
    packed_seq_params,
    unpack_tokens,
    valid_lengths,
)
from tests.distributed import ROOT, run_torchrun

WORKER = ROOT / "tests" / "workers" / "packing_worker.py"
LOGP_TOL = 1e-5
GRAD_REL_TOL = 1e-5


def padded_batch() -> dict[str, torch.Tensor]:
    """Three rows of lengths 6, 2, 4 in a [3, 6] padded layout; padding holds junk."""
    lengths = torch.tensor([6, 2, 4])
    b, s = 3, 6
    valid = torch.arange(s).unsqueeze(0) < lengths.unsqueeze(1)
    tokens = torch.arange(1, b * s + 1).reshape(b, s)
    return {
        "tokens": tokens,
        "labels": tokens + 100,
        "loss_mask": torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 0, 0, 0, 0],
                                   [0, 1, 1, 1, 0, 0]], dtype=torch.float32),
        "position_ids": torch.arange(s).expand(b, s).contiguous(),
        "advantages": torch.tensor([0.5, -1.0, 2.0]),
        "old_logp": torch.where(valid, -torch.rand(b, s), torch.full((b, s), float("nan"))),
        "lengths": lengths,
    }


def test_pack_layout_with_padding_segment() -> None:
    mb = padded_batch()
    packed = pack_microbatch(mb, pad_to_multiple=5)  # 12 real tokens -> 15
    assert packed["tokens"].shape == (1, 15)
    assert packed["tokens"][0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 13, 14, 15, 16, 0, 0, 0]
    assert packed["labels"][0, :12].tolist() == [t + 100 for t in
                                                 packed["tokens"][0, :12].tolist()]
    assert packed["cu_seqlens"].dtype == torch.int32
    assert packed["cu_seqlens"].tolist() == [0, 6, 8, 12, 15]  # dummy segment included
    assert int(packed["max_seqlen"]) == 6
    assert packed["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 0, 1, 2, 3, 0, 1, 2]
    assert packed["loss_mask"][0].tolist() == [0, 0, 1, 1, 1, 1, 0, 1, 0, 1, 1, 1, 0, 0, 0]
    # Per-row advantages become per-token; the dummy segment gets zeros.
    assert packed["advantages"][0].tolist() == [0.5] * 6 + [-1.0] * 2 + [2.0] * 4 + [0.0] * 3
    assert packed["old_logp"].shape == (1, 15)
    assert torch.isfinite(packed["old_logp"]).all()  # the nan padding was dropped
    assert packed["lengths"].tolist() == [6, 2, 4]


def test_pack_without_padding_and_fixed_total_length() -> None:
    mb = padded_batch()
    packed = pack_microbatch(mb)
    assert packed["tokens"].shape == (1, 12)
    assert packed["cu_seqlens"].tolist() == [0, 6, 8, 12]
    fixed = pack_microbatch(mb, pad_to_multiple=2, total_length=20)
    assert fixed["tokens"].shape == (1, 20)
    assert fixed["cu_seqlens"].tolist() == [0, 6, 8, 12, 20]
    assert int(fixed["max_seqlen"]) == 8  # the dummy segment is the longest here
    with pytest.raises(ValueError, match="total_length"):
        pack_microbatch(mb, pad_to_multiple=4, total_length=10)


def test_unpack_round_trip_and_gradient() -> None:
    mb = padded_batch()
    packed = pack_microbatch(mb, pad_to_multiple=8)
    valid = torch.arange(6).unsqueeze(0) < mb["lengths"].unsqueeze(1)
    for key in ("tokens", "labels", "loss_mask", "old_logp"):
        back = unpack_tokens(packed[key], packed)
        assert back.shape == mb[key].shape
        assert torch.equal(back[valid], mb[key][valid])
        assert not back[~valid].any()  # zeros at padding
    # Differentiable: a loss on the padded layout reaches the packed values.
    values = torch.randn(1, packed["tokens"].shape[1], requires_grad=True)
    unpack_tokens(values, packed).sum().backward()
    assert values.grad is not None
    assert values.grad[0].tolist() == [1.0] * 12 + [0.0] * 4


def test_empty_rows_are_left_out_of_the_segments() -> None:
    mb = padded_batch()
    mb["lengths"] = torch.tensor([3, 0, 4])
    packed = pack_microbatch(mb, pad_to_multiple=4)
    assert packed["cu_seqlens"].tolist() == [0, 3, 7, 8]
    assert packed["tokens"][0].tolist() == [1, 2, 3, 13, 14, 15, 16, 0]
    assert not unpack_tokens(packed["loss_mask"], packed)[1].any()
    nothing = pack_microbatch({**mb, "lengths": torch.zeros(3, dtype=torch.long)},
                              pad_to_multiple=2)
    assert nothing["cu_seqlens"].tolist() == [0, 2]  # the model never sees T = 0
    assert not nothing["loss_mask"].any()


def test_pack_rejects_bad_inputs() -> None:
    mb = padded_batch()
    with pytest.raises(ValueError, match="lengths"):
        pack_microbatch({**mb, "lengths": torch.tensor([7, 1, 1])})
    with pytest.raises(ValueError, match="cannot pack 'odd'"):
        pack_microbatch({**mb, "odd": torch.zeros(2, 2)})
    with pytest.raises(KeyError, match="lengths"):
        pack_microbatch({k: v for k, v in mb.items() if k != "lengths"})


def test_valid_lengths() -> None:
    mb = padded_batch()
    assert valid_lengths(mb["loss_mask"]).tolist() == [6, 2, 4]
    assert valid_lengths(torch.zeros(2, 5)).tolist() == [0, 0]


def test_packed_seq_params_is_thd() -> None:
    packed = pack_microbatch(padded_batch(), pad_to_multiple=8)
    params = packed_seq_params(packed)
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.tolist() == [0, 6, 8, 12, 16]
    for name in ("cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
        assert torch.equal(getattr(params, name), params.cu_seqlens_q)
    assert params.max_seqlen_q == params.max_seqlen_kv == 6
    assert isinstance(params.max_seqlen_q, int)  # hashable: rotary embeddings cache on it


@pytest.mark.parametrize("nproc", [1, 2], ids=["tp1", "tp2"])
def test_packed_forward_backward_matches_padded(tmp_path: Path, nproc: int) -> None:
    run_torchrun(nproc, WORKER, tmp_path, "dense", "deepseek_v3")
    results = json.loads((tmp_path / "result.json").read_text())
    for model, result in results.items():
        assert result["logp_max_abs_diff"] < LOGP_TOL, (model, result)
        assert result["grad_max_rel_diff"] < GRAD_REL_TOL, (model, result)
        assert result["num_params"] > 0
        # Without segment boundaries the same packed tokens give different logprobs:
        # the comparison can tell a correct packing from a wrong one.
        assert result["control_logp_min_diff"] > 1e-2, (model, result)
        assert all(n % 8 == 0 for n in result["packed_lengths"])
