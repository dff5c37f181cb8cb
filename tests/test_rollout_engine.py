"""The colocated rollout engine against transformers and against the training forward pass.

Tiny random Llama, Qwen2 and DeepSeek-V3 models are built with transformers, converted
to megatron checkpoints with the project's converter, loaded in a training layout (PP=2
on 2 gloo processes) and resharded into a generation layout (TP=2; TP=2 x EP=2; and for
DeepSeek-V3 also TP=1 x EP=2, whose expert-parallel group spans two data-parallel
replicas decoding different prompts in lock step). Prompts of different lengths.

* greedy decoding gives exactly the tokens of ``transformers``' ``generate`` (one prompt
  at a time there), with all prompts in flight at once and with two slots, continuous
  refills and a KV cache so short that it must compact;
* sampling with fixed per-request seeds is reproducible, also with another number of
  slots; the returned log-probabilities equal a recomputation by the training-layout
  forward pass (< 1e-4);
* EOS and stop strings end a response exactly where a plain re-reading of the greedy
  continuation says they should; without them every response has ``max_new_tokens``.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
importlib.import_module("torch.utils._device")._device_constructors()

from r1mega.convert import convert_hf_to_megatron  # noqa: E402
from tests.distributed import ROOT, run_torchrun  # noqa: E402
from tests.hf_models import save_tiny_hf_model  # noqa: E402
from tests.workers.engine_decode import decode_ids  # noqa: E402

WORKER = ROOT / "tests" / "workers" / "engine_decode.py"
MAX_NEW = 10
PROMPTS = [[5, 6, 7, 8, 9], [17, 3], [40, 41, 42, 43, 44, 45, 46, 47], [99], [8, 1, 20, 33]]
CASES = [
    # (name, HF model, training [tp, pp, ep], generation [tp, ep])
    ("llama", "llama", [1, 2, 1], [2, 1]),
    ("qwen2", "qwen2", [1, 2, 1], [1, 1]),
    ("deepseek_v3", "deepseek_v3", [1, 2, 1], [2, 2]),
    ("deepseek_v3_ep_across_dp", "deepseek_v3", [1, 2, 1], [1, 2]),
]


def _hf_greedy(model, prompt: list[int]) -> list[int]:
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, list]]:
    root = tmp_path_factory.mktemp("engine")
    models: dict[str, tuple[Path, list]] = {}
    cases = []
    for name, hf_name, train, generation in CASES:
        if hf_name not in models:
            hf_dir = root / f"hf_{hf_name}"
            hf_dir.mkdir()
            model = save_tiny_hf_model(hf_name, hf_dir)
            convert_hf_to_megatron(hf_dir, root / f"mg_{hf_name}")
            models[hf_name] = (hf_dir, [_hf_greedy(model, p) for p in PROMPTS])
        hf_dir, _ = models[hf_name]
        cases.append({"name": name, "megatron_dir": str(root / f"mg_{hf_name}"),
                      "hf_config": str(hf_dir / "config.json"), "train": train,
                      "generation": generation, "prompts": PROMPTS,
                      "max_new_tokens": MAX_NEW, "seed": 77})
    spec = root / "spec.json"
    spec.write_text(json.dumps({"out": str(root), "cases": cases}))
    run_torchrun(2, WORKER, spec, timeout=900)
    return {name: (json.loads((root / f"{name}.json").read_text()), models[hf][1])
            for name, hf, _, _ in CASES}


NAMES = [c[0] for c in CASES]


def _responses(samples: list[dict]) -> list[list[int]]:
    return [s["response"] for s in samples]


@pytest.mark.parametrize("name", NAMES)
def test_greedy_equals_transformers_generate(runs, name: str) -> None:
    result, hf = runs[name]
    assert _responses(result["all_at_once"]) == hf
    assert all(s["reason"] == "length" and not s["finished"] for s in result["all_at_once"])


@pytest.mark.parametrize("name", NAMES)
def test_continuous_batching_with_refills_and_compaction(runs, name: str) -> None:
    result, hf = runs[name]
    assert _responses(result["continuous"]) == hf
    stats = result["continuous_stats"]
    # Two slots for more prompts (all five, or three per data-parallel replica): later
    # prompts were prefilled into freed slots, and the cache (prompt + 1 x
    # max_new_tokens) had to be compacted to make room.
    assert stats["requests"] > 2 and stats["max_live_rows"] <= 2
    assert stats["prefill_rounds"] >= stats["requests"] - 1
    assert stats["compactions"] >= 1
    assert result["all_at_once_stats"]["compactions"] == 0


@pytest.mark.parametrize("name", NAMES)
def test_seeded_sampling_is_reproducible(runs, name: str) -> None:
    result, hf = runs[name]
    assert result["sampled"] == result["sampled_again"]
    assert _responses(result["sampled"]) == _responses(result["sampled_other_batching"])
    assert _responses(result["sampled"]) != hf  # temperature 0.9 is not greedy
    assert all(len(s["response"]) == MAX_NEW for s in result["sampled"])


@pytest.mark.parametrize("name", NAMES)
def test_logprobs_match_training_forward(runs, name: str) -> None:
    result, _ = runs[name]
    assert result["logprob_max_diff"] < 1e-4


def _expected_stop(response: list[int], hit) -> list[int]:
    for k in range(1, len(response) + 1):
        if hit(response[:k]):
            return response[:k]
    return response


@pytest.mark.parametrize("name", NAMES)
def test_eos_and_stop_strings(runs, name: str) -> None:
    result, hf = runs[name]
    eos, stop = result["eos_id"], result["stop_string"]
    for sample, full in zip(result["eos"], hf, strict=True):
        want = _expected_stop(full, lambda ids: ids[-1] == eos)
        assert sample["response"] == want
        assert sample["reason"] == ("eos" if eos in full else "length")
    for sample, full in zip(result["stop"], hf, strict=True):
        want = _expected_stop(full, lambda ids: stop in decode_ids(ids))
        assert sample["response"] == want
        assert sample["reason"] == ("stop" if want != full or stop in decode_ids(full)
                                    else "length")
    assert result["eos"][0]["reason"] == "eos" and result["stop"][1]["reason"] == "stop"
