"""The reward model: converted from transformers, equal scores at every layout.

A tiny random ``Qwen2ForSequenceClassification`` (one label; norms and score head
perturbed) is converted with the project's converter into a megatron model with a scalar
head (``model.head: scalar``). Its scores of (prompt, response) pairs of different
lengths, computed by :class:`~r1mega.rewards.reward_model.RewardModelScorer` (rows split
over DP ranks and microbatches, right-padded, read at each row's last token), equal
transformers' scores at world size 1 and the same scores under TP=2, PP=2 and DP=2
(< 1e-5).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
importlib.import_module("torch.utils._device")._device_constructors()

from r1mega.convert import ConversionError, convert_hf_to_megatron  # noqa: E402
from r1mega.rewards.tiny_reward_model import tiny_reward_model_hf  # noqa: E402
from tests.distributed import ROOT, run_torchrun  # noqa: E402

WORKER = ROOT / "tests" / "workers" / "reward_model_scores.py"
PAIRS = [("What is 2 + 2?", "<think> 2 + 2 </think> 4"), ("Say hi.", "hi"),
         ("Write a haiku about the sea.", "Waves fold into foam / the tide keeps its old time"),
         ("x", "y z")]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[float]]:
    root = tmp_path_factory.mktemp("rm")
    model = tiny_reward_model_hf(root / "hf")
    reference = []
    with torch.no_grad():
        for prompt, response in PAIRS:
            ids = torch.tensor([list((prompt + response).encode())])
            reference.append(model(ids).logits[0, 0].item())
    convert_hf_to_megatron(root / "hf", root / "mg", dtype="float32")
    return root, reference


@pytest.fixture(scope="module")
def scores(converted: tuple[Path, list[float]]) -> dict[str, list[float]]:
    root, _ = converted
    pairs = root / "pairs.json"
    pairs.write_text(json.dumps(PAIRS))
    run_torchrun(1, WORKER, root / "mg", pairs, root, 1, 1)
    for tp, pp in ((2, 1), (1, 2), (1, 1)):  # (1, 1) on 2 ranks: DP=2
        run_torchrun(2, WORKER, root / "mg", pairs, root, tp, pp)
    return {f.stem: json.loads(f.read_text()) for f in root.glob("scores-*.json")}


def test_scores_equal_transformers(converted, scores) -> None:
    _, reference = converted
    got = torch.tensor(scores["scores-tp1pp1"])
    assert torch.allclose(got, torch.tensor(reference), atol=1e-5), (got, reference)
    assert got.std() > 1e-3  # different texts, different scores: the test can fail


@pytest.mark.parametrize("layout", ["scores-tp2pp1", "scores-tp1pp2"])
def test_scores_equal_under_tp_and_pp(converted, scores, layout: str) -> None:
    _, reference = converted
    assert torch.allclose(torch.tensor(scores[layout]), torch.tensor(reference), atol=1e-5)


def test_multi_label_classifier_is_refused(tmp_path: Path) -> None:
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, num_labels=3)
    transformers.Qwen2ForSequenceClassification(config).save_pretrained(tmp_path / "hf")
    with pytest.raises(ConversionError, match="3 labels"):
        convert_hf_to_megatron(tmp_path / "hf", tmp_path / "mg")
