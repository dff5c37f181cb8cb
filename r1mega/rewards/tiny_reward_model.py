"""A tiny reward model for the CPU walk-through of the R1 pipeline and the tests.

Real runs point ``rewards.reward_model.load`` at a released reward model (a Hugging Face
``*ForSequenceClassification`` directory with one label), or at its conversion by
``r1mega convert hf-to-megatron``. The tiny CPU setup has none and downloads nothing, so
this module builds one: a small random ``Qwen2ForSequenceClassification`` for the byte
tokenizer, saved as safetensors (:func:`make_tiny_reward_model_dir`) and converted with
the project's converter (:func:`make_tiny_reward_model`). Its scores are meaningless but
deterministic, which is all the pipeline needs to run. The result is cached: a second
call with the same directory returns it.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

TINY_RM_CONFIG: dict[str, Any] = {
    "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
    "num_labels": 1, "pad_token_id": 256, "tie_word_embeddings": False,
}


def tiny_reward_model_hf(directory: str | Path, seed: int = 0) -> Any:
    """Save a random tiny HF reward model to ``directory``; returns the model."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.Qwen2ForSequenceClassification(
        transformers.Qwen2Config(**TINY_RM_CONFIG)).eval()
    with torch.no_grad():  # non-trivial norms so a mapping mix-up cannot hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
        model.score.weight.normal_(0.0, 0.5)
    model.save_pretrained(directory)
    return model


def make_tiny_reward_model(out_dir: str | Path, seed: int = 0) -> Path:
    """A converted tiny reward model at ``out_dir`` (built once, then reused)."""
    from r1mega.convert import convert_hf_to_megatron
    from r1mega.convert.hf_to_megatron import MODEL_CONFIG_NAME

    out = Path(out_dir)
    if (out / MODEL_CONFIG_NAME).exists():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        tiny_reward_model_hf(Path(tmp) / "hf", seed)
        out.parent.mkdir(parents=True, exist_ok=True)
        convert_hf_to_megatron(Path(tmp) / "hf", out, dtype="float32")
    return out


def make_tiny_reward_model_dir(out_dir: str | Path, seed: int = 0) -> Path:
    """The tiny reward model as a Hugging Face directory at ``out_dir``, as a released one
    is downloaded (built once, then reused); ``rewards.reward_model.load`` takes it as is."""
    out = Path(out_dir)
    if not (out / "config.json").exists():
        tiny_reward_model_hf(out, seed)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/tiny_reward_model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hf", action="store_true",
                        help="write the Hugging Face directory (as a released reward model "
                        "is downloaded) instead of its converted checkpoint")
    args = parser.parse_args(argv)
    make = make_tiny_reward_model_dir if args.hf else make_tiny_reward_model
    print(f"tiny reward model: {make(args.out, args.seed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
