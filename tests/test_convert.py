"""Checkpoint conversion Hugging Face <-> Megatron, verified against transformers.

Tiny random Llama (GQA, untied), Qwen2 (q/k/v biases, tied embeddings) and DeepSeek-V3
(MLA with low-rank q, dense first layer, 8 routed experts with node-limited sigmoid
routing and expert bias, a shared expert, one MTP layer) are built from transformers
configs in fp32, with norms, biases and router biases perturbed so a mix-up cannot
hide behind ones and zeros. transformers drops MTP weights, so the DeepSeek-V3 MTP
layer is added to the safetensors files as in the released checkpoint (second shard,
with an index), embedding and head copies included.

* logits of the converted checkpoint loaded by megatron equal transformers' logits
  (max |diff| < 1e-5) at TP=1 and at TP2xPP2 for all three, plus PP2xEP2 and TP2xEP2
  for DeepSeek-V3 (4 gloo processes, one torchrun for everything; SP on for MoE+TP);
* the converted files match what megatron itself saves for the model (keys, global
  shapes, dtypes, chunks, extra-state objects);
* HF -> Megatron -> HF is bit-exact for every tensor (MTP included), both straight
  from the converted checkpoint and from checkpoints re-saved by megatron at TP2xPP2,
  PP2xEP2 (multi-rank files); transformers loads the result; tokenizers travel along;
* FP8 block-scaled weights dequantize exactly as DeepSeek's reference formula, also
  end to end through a conversion;
* YaRN rope scaling maps onto megatron's (logits at world size 1, in process); MTP
  layers can be left out; an MTP copy that differs from the shared tensor is reported;
* the released DeepSeek-V3 config.json maps onto configs/r1_zero_671b.yaml's model;
* errors name the architecture (and refused options), the missing/unexpected tensors
  and both shapes, and a failed conversion leaves nothing behind;
* ``r1mega convert`` and the ``tools/`` scripts run.
"""

from __future__ import annotations

import importlib
import json
import math
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

# transformers builds models under ``with torch.device(...)``, which the CPU platform layer
# breaks if torch's list of factories is first built after it wrapped them (see
# r1mega.convert.megatron_layout._prime_device_context); build it now, at collection.
importlib.import_module("torch.utils._device")._device_constructors()

from r1mega.convert import (  # noqa: E402
    ConversionError,
    convert_hf_to_megatron,
    convert_megatron_to_hf,
    model_config_from_hf,
)
from r1mega.convert.fp8 import weight_dequant  # noqa: E402
from r1mega.convert.hf_reader import HFCheckpointReader  # noqa: E402
from tests.distributed import ROOT, run_torchrun  # noqa: E402
from tests.hf_models import save_tiny_hf_model  # noqa: E402

WORKER = ROOT / "tests" / "workers" / "convert_logits.py"
ATOL = 1e-5
TOKENS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
LAYOUTS = {
    "llama": [[1, 1, 1], [2, 2, 1]],
    "qwen2": [[1, 1, 1], [2, 2, 1]],
    "deepseek_v3": [[1, 1, 1], [2, 2, 1], [1, 2, 2], [2, 1, 2]],
}
# Layouts at which megatron re-saves the loaded weights ([1, 1, 1]: megatron's own files).
RESAVE = {
    "llama": [[1, 1, 1], [2, 2, 1]],
    "qwen2": [[1, 1, 1], [2, 2, 1]],
    "deepseek_v3": [[1, 1, 1], [2, 2, 1], [1, 2, 2]],
}


def _make_hf_checkpoint(name: str, directory: Path, **overrides: Any) -> torch.Tensor:
    """Save a tiny random model; return transformers' logits for TOKENS."""
    model = save_tiny_hf_model(name, directory, **overrides)
    with torch.no_grad():
        return model(TOKENS).logits


def hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF checkpoint directory (single file or shards)."""
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def assert_bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    differ = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not differ, differ


def assert_nothing_written(target: Path) -> None:
    assert not target.exists()
    assert not [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.tmp")]


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.Tensor]]:
    """HF directory and reference logits of each tiny model."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name in LAYOUTS:
        (root / name).mkdir()
        out[name] = (root / name, _make_hf_checkpoint(name, root / name))
    return out


@pytest.fixture(scope="module")
def converted(hf_models: dict[str, tuple[Path, torch.Tensor]],
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each tiny model converted to a megatron distributed checkpoint (in process)."""
    root = tmp_path_factory.mktemp("megatron")
    out = {}
    for name, (hf_dir, _) in hf_models.items():
        convert_hf_to_megatron(hf_dir, root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def layout_runs(hf_models: dict[str, tuple[Path, torch.Tensor]], converted: dict[str, Path],
                tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 4-process torchrun: every model at each of its layouts (logits + re-saves)."""
    out = tmp_path_factory.mktemp("layouts")
    torch.save(TOKENS, out / "tokens.pt")
    cases = [dict(name=name, megatron_dir=str(converted[name]),
                  hf_config=str(hf_models[name][0] / "config.json"),
                  tokens=str(out / "tokens.pt"), layouts=layouts, resave=RESAVE[name])
             for name, layouts in LAYOUTS.items()]
    (out / "spec.json").write_text(json.dumps({"out": str(out), "cases": cases}))
    run_torchrun(4, WORKER, out / "spec.json", timeout=600)
    return out


CASES = [(name, layout) for name, layouts in LAYOUTS.items() for layout in layouts]


@pytest.mark.parametrize(("name", "layout"), CASES,
                         ids=[f"{n}-tp{t}pp{p}ep{e}" for n, (t, p, e) in CASES])
def test_logits_equal_transformers(layout_runs: Path, hf_models: dict[str, Any], name: str,
                                   layout: list[int]) -> None:
    tp, pp, ep = layout
    got = torch.load(layout_runs / f"{name}-tp{tp}pp{pp}ep{ep}.pt")
    want = hf_models[name][1]
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < ATOL


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_converted_files_match_megatrons_own_save(layout_runs: Path, converted: dict[str, Path],
                                                  name: str) -> None:
    """Same keys, global shapes, dtypes, chunking and objects as megatron's save of the
    model (written by the worker at TP=PP=EP=1)."""
    import pickle

    def describe(directory: Path) -> dict[str, Any]:
        with open(directory / ".metadata", "rb") as f:
            md = pickle.load(f).state_dict_metadata
        out = {}
        for key, m in md.items():
            if hasattr(m, "chunks"):
                chunks = sorted((tuple(c.offsets), tuple(c.sizes)) for c in m.chunks)
                out[key] = (tuple(m.size), m.properties.dtype, chunks)
            else:
                out[key] = "bytes"
        return out

    ours, megatrons = describe(converted[name]), describe(layout_runs / f"{name}-saved-tp1pp1ep1")
    assert ours == megatrons
    assert json.loads((converted[name] / "metadata.json").read_text()) == {
        "sharded_backend": "torch_dist", "sharded_backend_version": 1}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_round_trip_is_bit_exact(hf_models: dict[str, Any], converted: dict[str, Path],
                                 tmp_path: Path, name: str) -> None:
    hf_dir, logits = hf_models[name]
    out = tmp_path / "hf"
    convert_megatron_to_hf(converted[name], out)
    assert_bit_exact(hf_tensors(out), hf_tensors(hf_dir))
    original = json.loads((hf_dir / "config.json").read_text())
    assert json.loads((out / "config.json").read_text()) == original
    for asset in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "tokenizer.model", "generation_config.json"):
        assert (out / asset).read_bytes() == (hf_dir / asset).read_bytes()
        assert (converted[name] / asset).is_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, logits)
    text = "w1 w7 w42 </s>"
    assert (transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"]
            == transformers.AutoTokenizer.from_pretrained(hf_dir)(text)["input_ids"])


MULTI_RANK = [(n, t) for n, ts in RESAVE.items() for t in ts if t != [1, 1, 1]]


@pytest.mark.parametrize(("name", "layout"), MULTI_RANK,
                         ids=[f"{n}-tp{t}pp{p}ep{e}" for n, (t, p, e) in MULTI_RANK])
def test_round_trip_from_multi_rank_checkpoint(layout_runs: Path, hf_models: dict[str, Any],
                                               tmp_path: Path, name: str,
                                               layout: list[int]) -> None:
    """Weights loaded and saved again by megatron at TP/PP/EP > 1 convert back to the
    original HF tensors bit for bit (MTP layer included)."""
    tp, pp, ep = layout
    hf_dir = hf_models[name][0]
    out = tmp_path / "hf"
    convert_megatron_to_hf(layout_runs / f"{name}-saved-tp{tp}pp{pp}ep{ep}", out,
                           hf_config=hf_dir)
    assert_bit_exact(hf_tensors(out), hf_tensors(hf_dir))


def test_synthesized_config_and_sharded_output_load_in_transformers(
        hf_models: dict[str, Any], converted: dict[str, Path], tmp_path: Path) -> None:
    """Without the stored HF config (a checkpoint trained from an r1mega YAML), the
    model section describes the model and a config.json is synthesized; a small shard
    limit splits the weights into several files with an index."""
    _, logits = hf_models["llama"]
    megatron_dir = tmp_path / "meg"
    shutil.copytree(converted["llama"], megatron_dir)
    (megatron_dir / "hf_config.json").unlink()
    (megatron_dir / "r1mega_config.yaml").unlink()  # nor a job config to describe it
    with pytest.raises(ConversionError, match="hf_config"):
        convert_megatron_to_hf(megatron_dir, tmp_path / "nothing")
    out = tmp_path / "hf"
    convert_megatron_to_hf(megatron_dir, out, model_config=megatron_dir / "r1mega_model.yaml",
                           max_shard_size="40KB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, logits)


def test_deepseek_v3_yarn_rope_maps_to_megatron(tmp_path: Path) -> None:
    """YaRN rope scaling (as in the released config, scaled down) maps onto megatron's
    YaRN: logits of a world-size-1 megatron model in this process equal transformers'."""
    from parallel.layout import Layout
    from parallel.platform import manual_seed
    from r1mega.checkpointing.model_io import load_model
    from r1mega.convert import load_model_config
    from r1mega.convert.megatron_layout import single_process_groups
    from r1mega.models import build_model

    (tmp_path / "hf").mkdir()
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
            "original_max_position_embeddings": 32, "beta_fast": 32.0, "beta_slow": 1.0,
            "mscale": 1.0, "mscale_all_dim": 1.0}
    logits = _make_hf_checkpoint("deepseek_v3", tmp_path / "hf", rope_parameters=yarn,
                                 num_nextn_predict_layers=0)
    model_cfg = convert_hf_to_megatron(tmp_path / "hf", tmp_path / "meg")
    assert (model_cfg.rope_type, model_cfg.rope_scaling_factor) == ("yarn", 4.0)
    with single_process_groups():
        manual_seed(0)
        model = build_model(load_model_config(tmp_path / "meg" / "r1mega_model.yaml"),
                            Layout(world_size=1))
        load_model([model], str(tmp_path / "meg"))
        model.eval()
        with torch.no_grad():
            positions = torch.arange(TOKENS.shape[1]).expand_as(TOKENS)
            got = model(input_ids=TOKENS, position_ids=positions, attention_mask=None)
    assert (got - logits).abs().max().item() < ATOL


def test_deepseek_v3_mtp_can_be_left_out(hf_models: dict[str, Any], tmp_path: Path) -> None:
    """``include_mtp=False`` (--no-mtp) drops the MTP layer in both directions."""
    full, _ = hf_models["deepseek_v3"]
    convert_hf_to_megatron(full, tmp_path / "meg", include_mtp=False)
    assert not any(p.startswith("mtp.") for p in _stored_keys(tmp_path / "meg"))
    convert_megatron_to_hf(tmp_path / "meg", tmp_path / "hf")
    want = {k: v for k, v in hf_tensors(full).items() if not k.startswith("model.layers.4.")}
    assert_bit_exact(hf_tensors(tmp_path / "hf"), want)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 0


def test_mtp_copy_that_differs_from_the_shared_tensor_is_reported(
        hf_models: dict[str, Any], tmp_path: Path) -> None:
    src = tmp_path / "ds"
    shutil.copytree(hf_models["deepseek_v3"][0], src)
    shard = src / "model-00002-of-00002.safetensors"
    tensors = hf_tensors(src)
    mtp = {k: v for k, v in tensors.items() if k.startswith("model.layers.4.")}
    mtp["model.layers.4.embed_tokens.weight"] = mtp["model.layers.4.embed_tokens.weight"] + 1
    save_file(mtp, str(shard), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="model.layers.4.embed_tokens.weight differs from "
                      "model.embed_tokens.weight"):
        convert_hf_to_megatron(src, tmp_path / "meg")


def _stored_keys(megatron_dir: Path) -> list[str]:
    import pickle

    with open(megatron_dir / ".metadata", "rb") as f:
        return list(pickle.load(f).state_dict_metadata)


def test_model_config_from_hf_matches_the_shipped_671b_config() -> None:
    """DeepSeek-V3's released config.json maps onto configs/r1_zero_671b.yaml's model."""
    from r1mega.convert import load_model_config

    released = {
        "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False,
        "aux_loss_alpha": 0.001, "first_k_dense_replace": 3, "hidden_act": "silu",
        "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
        "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
        "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8,
        "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
        "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
        "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                "quant_method": "fp8", "weight_block_size": [128, 128]},
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                         "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                         "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
        "seq_aux": True, "tie_word_embeddings": False, "topk_group": 4,
        "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "v_head_dim": 128,
        "vocab_size": 129280,
    }
    ours = vars(model_config_from_hf(released))
    shipped = vars(load_model_config(ROOT / "configs" / "r1_zero_671b.yaml"))
    # Training choices, not architecture: the balance-loss weight and implementation.
    for key in ("moe_aux_loss_coeff", "transformer_impl"):
        ours.pop(key), shipped.pop(key)
    assert ours == shipped


def _quantize_fp8(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block amax scaling to float8_e4m3fn, as DeepSeek's release stores weights."""
    rows, cols = w.shape
    scale_inv = torch.empty(math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            blk = (slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1]))
            s = w[blk].abs().max().clamp_min(1e-12) / 448.0
            q[blk] = (w[blk] / s).to(torch.float8_e4m3fn)
            scale_inv[i, j] = s
    return q, scale_inv


def _reference_dequant(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]
                       ) -> torch.Tensor:
    """DeepSeek's weight_dequant in plain PyTorch: x.float() * s per block, to bfloat16."""
    out = torch.empty(q.shape, dtype=torch.bfloat16)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            blk = (slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1]))
            out[blk] = (q[blk].float() * scale_inv[i, j]).to(torch.bfloat16)
    return out


def test_fp8_block_dequantization_matches_reference(tmp_path: Path) -> None:
    block = (128, 128)
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))  # partial edges
    q, s = _quantize_fp8(w, block)
    ref = _reference_dequant(q, s, block)
    assert torch.equal(weight_dequant(q, s, block), ref)
    # Through the reader: the scale is consumed, the weight reads as bfloat16.
    save_file({"layer.weight": q, "layer.weight_scale_inv": s}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(
        {"quantization_config": {"quant_method": "fp8", "weight_block_size": list(block)}}))
    reader = HFCheckpointReader(tmp_path)
    assert list(reader.tensors()) == ["layer.weight"]
    assert reader.tensors()["layer.weight"].dtype == torch.bfloat16
    assert torch.equal(reader.get("layer.weight"), ref)
    assert (ref.float() - w).abs().max() < 0.07 * w.abs().max()  # it is a quantization of w


def test_fp8_checkpoint_converts_dequantized(hf_models: dict[str, Any], tmp_path: Path) -> None:
    """A DeepSeek-V3 checkpoint laid out like the release (bfloat16, FP8 linear weights in
    16x16 blocks with partial edges, float32 router bias) converts to the dequantized
    values; back in HF every tensor has its original dtype, the FP8 ones are the
    bfloat16 dequantization, and no scales or quantization_config remain."""
    src, _ = hf_models["deepseek_v3"]
    fp8_dir = tmp_path / "fp8"
    fp8_dir.mkdir()
    block = (16, 16)
    expected = {}
    for file in src.glob("*.safetensors"):
        tensors = {}
        with safe_open(str(file), "pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                if k.endswith("proj.weight") and ".layers." in k:
                    q, s = _quantize_fp8(t, block)
                    tensors[k], tensors[k + "_scale_inv"] = q, s
                    expected[k] = _reference_dequant(q, s, block)
                else:
                    tensors[k] = t if "e_score_correction_bias" in k else t.to(torch.bfloat16)
                    expected[k] = tensors[k]
        save_file(tensors, str(fp8_dir / file.name), metadata={"format": "pt"})
    shutil.copy(src / "model.safetensors.index.json", fp8_dir)
    config = json.loads((src / "config.json").read_text())
    config.update(dtype="bfloat16", quantization_config={
        "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block)})
    (fp8_dir / "config.json").write_text(json.dumps(config))
    assert any("kv_b_proj.weight_scale_inv" in k for k in hf_tensors(fp8_dir))

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*differs from")  # MTP copies still agree
        convert_hf_to_megatron(fp8_dir, tmp_path / "meg")
    convert_megatron_to_hf(tmp_path / "meg", tmp_path / "hf")
    assert_bit_exact(hf_tensors(tmp_path / "hf"), expected)
    out_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "quantization_config" not in out_config and out_config["dtype"] == "bfloat16"


def test_unsupported_architecture_is_named(hf_models: dict[str, Any], tmp_path: Path) -> None:
    src = tmp_path / "mistral"
    shutil.copytree(hf_models["llama"][0], src)
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"architectures=\['MistralForCausalLM'\]"):
        convert_hf_to_megatron(src, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")
    # Options the megatron model cannot reproduce are refused by name.
    config = json.loads((hf_models["deepseek_v3"][0] / "config.json").read_text())
    for key, value in (("q_lora_rank", None), ("rope_interleave", False),
                       ("norm_topk_prob", False), ("scoring_func", "softmax"),
                       ("num_experts_per_tok", 4)):
        with pytest.raises(ConversionError, match=f"{key}={value!r}"):
            model_config_from_hf({**config, key: value})


def test_missing_extra_and_misshapen_tensors_are_listed(hf_models: dict[str, Any],
                                                        tmp_path: Path) -> None:
    src = tmp_path / "broken"
    shutil.copytree(hf_models["llama"][0], src)
    tensors = hf_tensors(src)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.rogue.weight"] = torch.zeros(3)
    tensors["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(64, 32)
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(ConversionError) as err:
        convert_hf_to_megatron(src, tmp_path / "out")
    message = str(err.value)
    assert "missing tensors (1):\n  model.layers.1.mlp.up_proj.weight" in message
    assert "unexpected tensors (1):\n  model.layers.0.self_attn.rogue.weight" in message
    assert ("model.layers.0.self_attn.o_proj.weight: checkpoint has [64, 32], expected "
            "[64, 64]") in message
    assert_nothing_written(tmp_path / "out")


def test_megatron_side_mismatches_are_listed(hf_models: dict[str, Any],
                                             converted: dict[str, Path], tmp_path: Path) -> None:
    # A Qwen2 config (q/k/v biases) against the Llama checkpoint: the biases are missing.
    config = json.loads((hf_models["llama"][0] / "config.json").read_text())
    config["architectures"] = ["Qwen2ForCausalLM"]
    (tmp_path / "qwen2.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"missing tensors .*\n.*"
                       r"decoder\.layers\.self_attention\.linear_qkv\.bias"):
        convert_megatron_to_hf(converted["llama"], tmp_path / "out", hf_config=tmp_path /
                               "qwen2.json")
    # Three layers against a two-layer checkpoint: stacked layer tensors differ in shape.
    config = json.loads((hf_models["llama"][0] / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (tmp_path / "deeper.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError,
                       match=r"decoder\.layers\.self_attention\.linear_proj\.weight: checkpoint "
                       r"has \(2, 64, 64\), model expects \(3, 64, 64\)"):
        convert_megatron_to_hf(converted["llama"], tmp_path / "out", hf_config=tmp_path /
                               "deeper.json")
    assert_nothing_written(tmp_path / "out")


def test_failure_while_writing_leaves_nothing(hf_models: dict[str, Any], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    original = HFCheckpointReader.get

    def flaky(self: HFCheckpointReader, name: str) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk went away")
        return original(self, name)

    monkeypatch.setattr(HFCheckpointReader, "get", flaky)
    (tmp_path / "out").mkdir()  # an empty directory may be the target
    with pytest.raises(OSError, match="disk went away"):
        convert_hf_to_megatron(hf_models["qwen2"][0], tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    (tmp_path / "out" / "something").write_text("x")
    with pytest.raises(ConversionError, match="already exists"):
        convert_hf_to_megatron(hf_models["qwen2"][0], tmp_path / "out")


def test_cli_and_tools(hf_models: dict[str, Any], tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    import pickle

    from r1mega.cli import main

    hf_dir, _ = hf_models["qwen2"]
    meg = tmp_path / "meg"
    assert main(["convert", "hf-to-megatron", str(hf_dir), str(meg), "--dtype", "bfloat16"]) == 0
    with open(meg / ".metadata", "rb") as f:
        dtypes = {k: m.properties.dtype for k, m in pickle.load(f).state_dict_metadata.items()
                  if hasattr(m, "properties")}
    # Linear weights and biases in bfloat16; megatron keeps (torch) RMSNorm weights float32.
    assert {k for k, d in dtypes.items() if d != torch.bfloat16} == {
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
        "decoder.layers.mlp.linear_fc1.layer_norm_weight", "decoder.final_layernorm.weight"}
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    (bad / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    assert main(["convert", "hf-to-megatron", str(bad), str(tmp_path / "x")]) == 2
    assert "GPT2LMHeadModel" in capsys.readouterr().err
    # The thin script, as a user runs it.
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert_megatron_to_hf.py"), str(meg),
         str(tmp_path / "hf"), "--dtype", "float32"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    expected = {k: v if "norm" in k else v.to(torch.bfloat16).float()
                for k, v in hf_tensors(hf_dir).items()}
    assert_bit_exact(hf_tensors(tmp_path / "hf"), expected)
    help_out = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_hf_to_megatron.py"),
                               "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert help_out.returncode == 0 and "--no-mtp" in help_out.stdout
