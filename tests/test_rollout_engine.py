"""The rollout engine (megatron-core's dynamic inference engine) against transformers and
against the training forward pass.

Tiny random Llama, Qwen2 and DeepSeek-V3 models are built with transformers, converted
to megatron checkpoints with the project's converter, loaded in a training layout (PP=2
on 2 gloo processes) and resharded into a generation layout (TP=2; TP=1; TP=2 x EP=2;
and for DeepSeek-V3 also TP=1 x EP=2, whose expert-parallel group spans two data-parallel
replicas decoding different prompts in lock step). The path is the one GPUs run: paged
KV blocks, continuous batching, chunked prefill, prefix caching and (DeepSeek-V3) MLA's
latent cache with absorbed decode, on the CPU paged attention of ``parallel.platform``;
DeepSeek-V3 cannot decode at all without the MLA fix (a) of ``parallel.upstream_fixes``.

* greedy decoding gives exactly the tokens of ``transformers``' ``generate`` (one prompt
  at a time there): all prompts at once; two at a time (continuous batching); and a GRPO
  group of identical prompts longer than a KV block (prefix sharing: the prompt is
  prefilled once per replica plus the unshared tail per sample), also with a step budget
  shorter than the prompt (chunked prefill);
* sampling with fixed per-request seeds is reproducible, also with another batching;
  the returned log-probabilities equal a recomputation by the training-layout forward
  pass (< 1e-5, fp32);
* EOS and stop strings end a response exactly where a plain re-reading of the greedy
  continuation says they should; without them every response has ``max_new_tokens``;
* the KV buffer is held only while generating (suspended otherwise) and holds the MLA
  latent, not per-head keys and values;
* a weight change between calls never meets stale prefix-cached KV (and the check sees
  it when the engine's reset is switched off);
* MoE routing replay: when the generation model routes differently from the trainer,
  replaying the recorded experts makes the trainer's log-probabilities (and a GRPO
  step's parity metrics) agree with the rollout's.
"""

from __future__ import annotations

import importlib
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
importlib.import_module("torch.utils._device")._device_constructors()

from r1mega.convert import convert_hf_to_megatron  # noqa: E402
from tests.distributed import ROOT, run_torchrun  # noqa: E402
from tests.hf_models import save_tiny_hf_model  # noqa: E402
from tests.workers.engine_decode import GROUP, decode_ids  # noqa: E402

WORKER = ROOT / "tests" / "workers" / "engine_decode.py"
MAX_NEW = 10
PROMPTS = [[5, 6, 7, 8, 9], [17, 3], [40, 41, 42, 43, 44, 45, 46, 47], [99], [8, 1, 20, 33]]
LONG_PROMPT = [(7 * i) % 250 + 3 for i in range(70)]  # longer than one KV block
CASES = [
    # (name, HF model, training [tp, pp, ep], generation [tp, ep], KV block, extra checks)
    ("llama", "llama", [1, 2, 1], [2, 1], 16, ["stale"]),
    ("qwen2", "qwen2", [1, 2, 1], [1, 1], 16, []),
    ("deepseek_v3", "deepseek_v3", [1, 2, 1], [2, 2], 64, []),
    ("deepseek_v3_ep_across_dp", "deepseek_v3", [1, 2, 1], [1, 2], 64, ["routing"]),
]
NAMES = [c[0] for c in CASES]


def _hf_greedy(model, prompt: list[int]) -> list[int]:
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, dict]]:
    root = tmp_path_factory.mktemp("engine")
    models: dict[str, dict] = {}
    cases = []
    for name, hf_name, train, generation, block, extras in CASES:
        if hf_name not in models:
            hf_dir = root / f"hf_{hf_name}"
            hf_dir.mkdir()
            model = save_tiny_hf_model(hf_name, hf_dir)
            convert_hf_to_megatron(hf_dir, root / f"mg_{hf_name}")
            models[hf_name] = {"dir": hf_dir, "greedy": [_hf_greedy(model, p) for p in PROMPTS],
                               "long": _hf_greedy(model, LONG_PROMPT),
                               "config": json.loads((hf_dir / "config.json").read_text())}
        cases.append({"name": name, "megatron_dir": str(root / f"mg_{hf_name}"),
                      "hf_config": str(models[hf_name]["dir"] / "config.json"), "train": train,
                      "generation": generation, "prompts": PROMPTS, "long_prompt": LONG_PROMPT,
                      "max_new_tokens": MAX_NEW, "seed": 77, "block_tokens": block,
                      "extras": extras})
    spec = root / "spec.json"
    spec.write_text(json.dumps({"out": str(root), "cases": cases}))
    run_torchrun(2, WORKER, spec, timeout=1200)
    return {c[0]: (json.loads((root / f"{c[0]}.json").read_text()), models[c[1]])
            for c in CASES}


def _responses(samples: list[dict]) -> list[list[int]]:
    return [s["response"] for s in samples]


@pytest.mark.parametrize("name", NAMES)
def test_greedy_equals_transformers_generate(runs, name: str) -> None:
    result, hf = runs[name]
    assert _responses(result["all_at_once"]) == hf["greedy"]
    assert all(s["reason"] == "length" and not s["finished"] for s in result["all_at_once"])
    assert _responses(result["continuous"]) == hf["greedy"]
    assert _responses(result["group"]) == [hf["long"]] * GROUP
    assert _responses(result["chunked"]) == [hf["long"]] * GROUP


@pytest.mark.parametrize("name", NAMES)
def test_continuous_batching_and_chunked_prefill(runs, name: str) -> None:
    result, _ = runs[name]
    stats = result["continuous_stats"]
    # Two requests at a time for more prompts (all five, or three per data-parallel
    # replica); a 64-token step budget that the 70-token prompt exceeds.
    assert stats["requests"] > 2 and stats["max_active_requests"] <= 2
    assert result["chunked_stats"]["chunked_prefill_steps"] >= 1
    if name == "deepseek_v3_ep_across_dp":  # 3 and 2 prompts: the idle replica keeps pace
        assert result["continuous_dummy_steps_all_ranks"] > 0
    assert result["group_stats"]["chunked_prefill_steps"] == 0


@pytest.mark.parametrize("name", NAMES)
def test_seeded_sampling_is_reproducible(runs, name: str) -> None:
    result, hf = runs[name]
    assert result["sampled"] == result["sampled_again"]
    assert _responses(result["sampled"]) == _responses(result["sampled_other_batching"])
    assert _responses(result["sampled"]) != hf["greedy"]  # temperature 0.9 is not greedy
    assert all(len(s["response"]) == MAX_NEW for s in result["sampled"])


def test_samples_do_not_depend_on_the_generation_layout(runs) -> None:
    """Same model, prompts and seeds at TP=2 x EP=2 (one replica) and at EP=2 across two
    data-parallel replicas: the same samples."""
    one, two = runs["deepseek_v3"][0], runs["deepseek_v3_ep_across_dp"][0]
    assert _responses(one["sampled"]) == _responses(two["sampled"])


@pytest.mark.parametrize("name", NAMES)
def test_logprobs_match_training_forward(runs, name: str) -> None:
    result, _ = runs[name]
    assert result["logprob_max_diff"] < 1e-5


def _expected_stop(response: list[int], hit) -> list[int]:
    for k in range(1, len(response) + 1):
        if hit(response[:k]):
            return response[:k]
    return response


@pytest.mark.parametrize("name", NAMES)
def test_eos_and_stop_strings(runs, name: str) -> None:
    result, hf = runs[name]
    eos, stop = result["eos_id"], result["stop_string"]
    for sample, full in zip(result["eos"], hf["greedy"], strict=True):
        want = _expected_stop(full, lambda ids: ids[-1] == eos)
        assert sample["response"] == want
        assert sample["reason"] == ("eos" if eos in full else "length")
    for sample, full in zip(result["stop"], hf["greedy"], strict=True):
        want = _expected_stop(full, lambda ids: stop in decode_ids(ids))
        assert sample["response"] == want
        assert sample["reason"] == ("stop" if want != full or stop in decode_ids(full)
                                    else "length")
    assert result["eos"][0]["reason"] == "eos" and result["stop"][1]["reason"] == "stop"


@pytest.mark.parametrize("name", NAMES)
def test_group_prefills_its_prompt_once(runs, name: str) -> None:
    result, _ = runs[name]
    stats = result["group_stats"]
    block = dict((c[0], c[4]) for c in CASES)[name]
    length = len(LONG_PROMPT)
    shared = (length // block) * block  # whole blocks of the prompt
    group = stats["requests"]  # this replica's share of the group
    assert stats["prefix_cache_hits"] == group - 1
    assert stats["prefill_tokens_skipped"] == (group - 1) * shared
    assert stats["prefill_tokens_computed"] == length + (group - 1) * (length - shared)


@pytest.mark.parametrize("name", NAMES)
def test_kv_memory_is_the_latent_and_is_freed_between_calls(runs, name: str) -> None:
    result, hf = runs[name]
    config, tp = hf["config"], dict((c[0], c[3][0]) for c in CASES)[name]
    layers, fp32 = config["num_hidden_layers"], 4
    if "kv_lora_rank" in config:  # MLA: one latent per token, shared by all heads
        per_token = (config["kv_lora_rank"] + config["qk_rope_head_dim"]) * layers * fp32
    else:
        head_dim = config["hidden_size"] // config["num_attention_heads"]
        per_token = 2 * layers * (config["num_key_value_heads"] // tp) * head_dim * fp32
    assert result["group_stats"]["kv_bytes_per_token"] == per_token
    assert result["memory"]["context_bytes_per_token"] == per_token  # what megatron allocates
    assert result["memory"]["memory/generation/kv_cache_gib"] > 0
    assert result["memory"]["after"] == 0  # suspended once generation is over


def test_weight_change_never_reuses_stale_kv(runs) -> None:
    stale = runs["llama"][0]["stale"]
    assert stale["engine"] < 1e-5  # first token after the change: as a full recompute
    assert stale["without_reset"] > 1e-3  # the check sees stale KV when it is reused


def test_routing_replay_makes_trainer_and_rollout_agree(runs) -> None:
    result = runs["deepseek_v3_ep_across_dp"][0]["routing"]
    config = runs["deepseek_v3_ep_across_dp"][1]["config"]
    moe_layers = config["num_hidden_layers"] - config["first_k_dense_replace"]
    assert [s[0] for s in result["routing_shapes"]] == result["lengths"]
    assert {tuple(s[1:]) for s in result["routing_shapes"]} == {
        (moe_layers, config["num_experts_per_tok"])}
    assert result["gap_without_replay"] > 1e-3  # routing flipped between the two
    assert result["gap_with_replay"] < 1e-5
    assert result["step_with_replay"]["rollout/logprob_diff_max"] < 1e-5
    assert result["step_with_replay"]["rollout/logprob_diff_outlier_frac"] == 0
    assert result["step_without_replay"]["rollout/logprob_diff_max"] > 1e-3
    assert result["step_without_replay"]["rollout/logprob_diff_outlier_frac"] > 0
    # Two minibatches (two updates): each replays its own rows' routing.
    assert result["minibatches_with_replay"]["updates"] == 2
    assert result["minibatches_with_replay"]["rollout/logprob_diff_max"] < 1e-5
