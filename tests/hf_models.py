"""Tiny random Hugging Face models saved the way released checkpoints are, for tests.

Llama (GQA, untied), Qwen2 (q/k/v biases, tied embeddings) and DeepSeek-V3 (MLA with
low-rank q, dense first layer, 8 routed experts with node-limited sigmoid routing and
expert bias, a shared expert, one MTP layer) in fp32, with norms, biases and router
biases perturbed so a mix-up cannot hide behind ones and zeros. transformers drops MTP
weights, so the DeepSeek-V3 MTP layer is added to the safetensors files as in the
released checkpoint (second shard, with an index), embedding and head copies included.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from tools.make_tiny_hf_model import add_mtp_layer as mtp_layer_tensors


def hf_config(name: str, **overrides: Any) -> Any:
    common = dict(vocab_size=256, hidden_size=64, num_attention_heads=4,
                  max_position_embeddings=128)
    if name == "llama":
        return transformers.LlamaConfig(**common, intermediate_size=96, num_hidden_layers=2,
                                        num_key_value_heads=2, rope_theta=500000.0)
    if name == "qwen2":
        return transformers.Qwen2Config(**common, intermediate_size=96, num_hidden_layers=2,
                                        num_key_value_heads=2, tie_word_embeddings=True)
    fields = dict(
        intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
        num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
        n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, rope_interleave=True, num_nextn_predict_layers=1)
    return transformers.DeepseekV3Config(**common, **{**fields, **overrides})


def write_tokenizer(directory: Path) -> None:
    """A word-level tokenizer (tokenizer.json etc.) plus a stand-in tokenizer.model."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(100)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>",
        "bos_token": "<s>", "eos_token": "</s>"}))
    (directory / "special_tokens_map.json").write_text(json.dumps({
        "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}))
    (directory / "tokenizer.model").write_bytes(b"sentencepiece stand-in")


def add_mtp_layer(directory: Path, num_layers: int, hidden: int) -> None:
    """Add DeepSeek-V3's MTP layer ``model.layers.{L}`` as a second shard with an index,
    the way the released checkpoint stores it."""
    main_file = directory / "model.safetensors"
    with safe_open(str(main_file), "pt") as f:
        main = {k: f.get_tensor(k) for k in f.keys()}
    mtp = mtp_layer_tensors(main, num_layers, hidden)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    main_file.rename(directory / names[0])
    save_file(mtp, str(directory / names[1]), metadata={"format": "pt"})
    weight_map = {**{k: names[0] for k in main}, **{k: names[1] for k in mtp}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": weight_map}))


def save_tiny_hf_model(name: str, directory: Path, **overrides: Any) -> Any:
    """Save a tiny random model (with tokenizer files, and for DeepSeek-V3 the MTP layer)
    to ``directory``; returns the transformers model in eval mode."""
    torch.manual_seed(0)
    config = hf_config(name, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
        for bname, b in model.named_buffers():
            if "e_score_correction_bias" in bname:
                b.copy_(0.1 * torch.randn_like(b))
    model.save_pretrained(directory)
    write_tokenizer(directory)
    if name == "deepseek_v3" and config.num_nextn_predict_layers:
        add_mtp_layer(directory, config.num_hidden_layers, config.hidden_size)
    return model
