"""Write a tiny random Hugging Face model directory, shaped like a released one.

    python tools/make_tiny_hf_model.py qwen2 models/tiny-qwen2
    python tools/make_tiny_hf_model.py deepseek_v3 models/tiny-dsv3 --fp8

What a user downloads, in miniature, so that the README's "From a Hugging Face model"
commands run on a CPU: ``config.json``, ``generation_config.json``, safetensors weights
(float32; norms and biases perturbed so that no mix-up hides behind ones and zeros), and
a real byte-level BPE tokenizer trained here on a few KB of text (the R1-Zero template,
arithmetic, ``<think>``/``<answer>`` tags) with ``<|endoftext|>`` as EOS and a chat
template. ``qwen2``: Qwen2 (GQA, q/k/v biases, tied embeddings); ``llama``: Llama;
``deepseek_v3``: DeepSeek-V3 (MLA, 8 routed experts with node-limited sigmoid routing and
a shared expert, one multi-token-prediction layer stored the way the release stores it,
which ``transformers`` itself would not save). ``--fp8`` writes it in the release's
FP8 format instead: linear weights as float8_e4m3fn in 128x128 blocks with
``weight_scale_inv``, the rest bfloat16, and ``quantization_config`` in ``config.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
VOCAB = 512
BLOCK = (128, 128)


def corpus() -> list[str]:
    """Text the tokenizer learns its merges from: what the tiny runs feed the model."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from r1mega.data.templates import R1_ZERO_TEMPLATE

    lines = [R1_ZERO_TEMPLATE.replace("{prompt}", f"What is {a} + {b}?")
             for a in range(10) for b in range(10)]
    lines += [f"<think> {a} + {b} = {a + b} </think> <answer> {a + b} </answer>"
              for a in range(10) for b in range(10)]
    lines += ["The quick brown fox jumps over the lazy dog. " * 4,
              "Solve the problem step by step, then give the final answer."]
    return lines


def write_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=448, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def hf_config(arch: str):  # noqa: ANN201 - a transformers config
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, max_position_embeddings=1024,
                  bos_token_id=None, eos_token_id=0, pad_token_id=0, dtype="float32")
    # A wide initialisation for the dense models: greedy decoding of a random model with
    # the default 0.02 repeats one token, which would make token-for-token checks weak.
    dense = dict(initializer_range=0.3, num_attention_heads=4, intermediate_size=128)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common, **dense,
                                        num_hidden_layers=2, num_key_value_heads=2,
                                        tie_word_embeddings=True, rope_theta=1000000.0)
    if arch == "llama":
        return transformers.LlamaConfig(**common, **dense,
                                        num_hidden_layers=2, num_key_value_heads=2,
                                        rope_theta=500000.0)
    # 8 heads and a 192-wide dense MLP: some weights span two 128-row FP8 blocks.
    return transformers.DeepseekV3Config(
        **common, num_attention_heads=8, intermediate_size=192, moe_intermediate_size=32,
        num_hidden_layers=4, num_key_value_heads=8, n_shared_experts=1, n_routed_experts=8,
        num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5,
        norm_topk_prob=True, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, rope_interleave=True,
        num_nextn_predict_layers=1, tie_word_embeddings=False)


def add_mtp_layer(tensors: dict, num_layers: int, hidden: int) -> dict:
    """DeepSeek-V3's MTP layer ``model.layers.{L}`` as the release stores it: a decoder
    layer, enorm/hnorm/eh_proj, its own final norm and copies of embedding and head."""
    import torch

    g = torch.Generator().manual_seed(3)
    src, dst = f"model.layers.{num_layers - 1}.", f"model.layers.{num_layers}."
    mtp = {dst + k[len(src):]: (t + 0.01 * torch.randn(t.shape, generator=g)).contiguous()
           for k, t in tensors.items() if k.startswith(src)}
    for norm in ("enorm", "hnorm", "shared_head.norm"):
        mtp[f"{dst}{norm}.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
    mtp[f"{dst}eh_proj.weight"] = 0.02 * torch.randn(hidden, 2 * hidden, generator=g)
    mtp[f"{dst}embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    mtp[f"{dst}shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    return mtp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("arch", choices=("qwen2", "llama", "deepseek_v3"))
    parser.add_argument("out", type=Path, help="directory to create")
    parser.add_argument("--fp8", action="store_true",
                        help="DeepSeek-V3's FP8 release format (128x128 blocks)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import torch
    import transformers
    from safetensors.torch import save_file

    if args.fp8 and args.arch != "deepseek_v3":
        parser.error("--fp8 is DeepSeek-V3's release format")
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} exists and is not empty")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    config = hf_config(args.arch)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.1 * torch.randn_like(b))
    model.save_pretrained(args.out)
    write_tokenizer(args.out)
    if args.arch == "deepseek_v3":
        # One file with the MTP layer, as the release has it (and transformers would drop).
        from safetensors import safe_open

        files = sorted(args.out.glob("*.safetensors"))
        tensors = {}
        for file in files:
            with safe_open(str(file), "pt") as f:
                tensors.update({k: f.get_tensor(k) for k in f.keys()})
            file.unlink()
        (args.out / "model.safetensors.index.json").unlink(missing_ok=True)
        tensors.update(add_mtp_layer(tensors, config.num_hidden_layers, config.hidden_size))
        if args.fp8:
            from r1mega.convert.fp8 import is_release_fp8_weight, quantization_config
            from r1mega.models.fp8_blocks import block_quantize

            for name in [n for n in tensors if is_release_fp8_weight(n)]:
                q, scale_inv = block_quantize(tensors[name].to(torch.bfloat16), BLOCK)
                tensors[name], tensors[name + "_scale_inv"] = q, scale_inv
            for name, t in tensors.items():
                if t.dtype == torch.float32 and "_scale_inv" not in name \
                        and "e_score_correction_bias" not in name:
                    tensors[name] = t.to(torch.bfloat16)
            cfg = json.loads((args.out / "config.json").read_text())
            cfg.update(dtype="bfloat16", quantization_config=quantization_config(BLOCK))
            (args.out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in tensors.items()},
                  str(args.out / "model.safetensors"), metadata={"format": "pt"})
    print(f"wrote {args.out} ({args.arch}{', FP8' if args.fp8 else ''}, vocabulary "
          f"{len(transformers.AutoTokenizer.from_pretrained(args.out))} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
