"""The reward model: converted from transformers, equal scores at every layout.

A tiny random ``Qwen2ForSequenceClassification`` (one label; norms and score head
perturbed) is converted with the project's converter into a megatron model with a scalar
head (``model.head: scalar``). Its scores of (prompt, response) pairs of different
lengths, computed by :class:`~r1mega.rewards.reward_model.RewardModelScorer` (rows split
over DP ranks and microbatches, right-padded, read at each row's last token), equal
transformers' scores at world size 1 and the same scores under TP=2, PP=2 and DP=2
(< 1e-5).

The HF directory itself as ``rewards.reward_model.load`` scores the same: converted
once into the cache by the world-size-1 run, reused unconverted by the TP=2 run. A
reward model with its own tokenizer and chat template scores the conversation as
``transformers`` does with ``apply_chat_template`` (its vocabulary, not the policy's).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
importlib.import_module("torch.utils._device")._device_constructors()

from r1mega.config import ConfigError  # noqa: E402
from r1mega.config.from_weights import reward_model_source  # noqa: E402
from r1mega.convert import ConversionError, convert_hf_to_megatron  # noqa: E402
from r1mega.rewards.tiny_reward_model import tiny_reward_model_hf  # noqa: E402
from tests.distributed import ROOT, run_torchrun  # noqa: E402

WORKER = ROOT / "tests" / "workers" / "reward_model_scores.py"
PAIRS = [("What is 2 + 2?", "<think> 2 + 2 </think> 4"), ("Say hi.", "hi"),
         ("Write a haiku about the sea.", "Waves fold into foam / the tide keeps its old time"),
         ("x", "y z")]


def _chat_reward_model(directory: Path) -> tuple[Any, Any]:
    """A second tiny reward model, with the BPE tokenizer and chat template of the tiny HF
    models (tools/make_tiny_hf_model.py) saved beside it."""
    from tools.make_tiny_hf_model import write_tokenizer

    model = tiny_reward_model_hf(directory, seed=1)
    write_tokenizer(directory)
    return model, transformers.AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[Path, list[float], list[float]]:
    root = tmp_path_factory.mktemp("rm")
    model = tiny_reward_model_hf(root / "hf")
    chat_model, chat_tokenizer = _chat_reward_model(root / "hf_chat")
    reference, chat_reference = [], []
    with torch.no_grad():
        for prompt, response in PAIRS:
            ids = torch.tensor([list((prompt + response).encode())])
            reference.append(model(ids).logits[0, 0].item())
            conversation = [{"role": "user", "content": prompt},
                            {"role": "assistant", "content": response}]
            ids = chat_tokenizer.apply_chat_template(conversation, tokenize=True)["input_ids"]
            chat_reference.append(chat_model(torch.tensor([ids])).logits[0, 0].item())
    convert_hf_to_megatron(root / "hf", root / "mg", dtype="float32")
    return root, reference, chat_reference


@pytest.fixture(scope="module")
def scores(converted: tuple[Path, list[float], list[float]]) -> dict[str, list[float]]:
    root = converted[0]
    pairs = root / "pairs.json"
    pairs.write_text(json.dumps(PAIRS))
    mg, hf, chat = f"mg={root / 'mg'}", f"hf={root / 'hf'}", f"chat={root / 'hf_chat'}"
    first = run_torchrun(1, WORKER, pairs, root, 1, 1, mg, hf, chat)
    assert first.stdout.count("[r1mega] converting") == 2  # the two HF directories
    # The TP=2 job finds the HF directory's conversion in the cache and converts nothing.
    tp2 = run_torchrun(2, WORKER, pairs, root, 2, 1, mg, hf)
    assert "[r1mega] converting" not in tp2.stdout and "reward model from" in tp2.stdout
    assert len([p for p in (root / "cache").iterdir() if p.is_dir()]) == 2
    for tp, pp in ((1, 2), (1, 1)):  # (1, 1) on 2 ranks: DP=2
        run_torchrun(2, WORKER, pairs, root, tp, pp, mg)
    return {f.stem: json.loads(f.read_text()) for f in root.glob("scores-*.json")}


def test_scores_equal_transformers(converted, scores) -> None:
    _, reference, _ = converted
    got = torch.tensor(scores["scores-tp1pp1-mg"])
    assert torch.allclose(got, torch.tensor(reference), atol=1e-5), (got, reference)
    assert got.std() > 1e-3  # different texts, different scores: the test can fail


@pytest.mark.parametrize("layout", ["scores-tp2pp1-mg", "scores-tp1pp2-mg"])
def test_scores_equal_under_tp_and_pp(converted, scores, layout: str) -> None:
    _, reference, _ = converted
    assert torch.allclose(torch.tensor(scores[layout]), torch.tensor(reference), atol=1e-5)


@pytest.mark.parametrize("layout", ["scores-tp1pp1-hf", "scores-tp2pp1-hf"])
def test_hf_directory_as_the_reward_model_scores_as_transformers(converted, scores,
                                                                 layout: str) -> None:
    _, reference, _ = converted
    assert torch.allclose(torch.tensor(scores[layout]), torch.tensor(reference), atol=1e-5)


def test_reward_model_reads_its_own_tokenizer_and_chat_template(converted, scores) -> None:
    _, reference, chat_reference = converted
    got = torch.tensor(scores["scores-tp1pp1-chat"])
    assert torch.allclose(got, torch.tensor(chat_reference), atol=1e-5), (got, chat_reference)
    # Another model read through another vocabulary: not the byte-tokenized scores.
    assert not torch.allclose(got, torch.tensor(reference), atol=1e-2)


def test_multi_label_classifier_is_refused(tmp_path: Path) -> None:
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, num_labels=3)
    transformers.Qwen2ForSequenceClassification(config).save_pretrained(tmp_path / "hf")
    with pytest.raises(ConversionError, match="3 labels"):
        convert_hf_to_megatron(tmp_path / "hf", tmp_path / "mg")
    # ... and named by its config key before any process starts.
    with pytest.raises(ConfigError, match=rf"^rewards.reward_model.load={tmp_path / 'hf'}: "
                       "config.json: config.json has 3 labels"):
        reward_model_source(tmp_path / "hf")
