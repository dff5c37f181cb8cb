"""``r1mega convert hf-to-megatron | megatron-to-hf``, also behind the thin scripts
``tools/convert_hf_to_megatron.py`` and ``tools/convert_megatron_to_hf.py``.

Parsing imports nothing heavy; a :class:`~r1mega.convert.errors.ConversionError` is
printed as one message and exit status 2 (nothing has been written then).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

_DTYPES = ("float32", "bfloat16", "float16")


def add_hf_to_megatron_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_dir", help="Hugging Face checkpoint directory (config.json + "
                        "model.safetensors or model.safetensors.index.json shards)")
    parser.add_argument("out_dir", help="megatron distributed checkpoint to create (must not "
                        "exist, or be empty)")
    parser.add_argument("--dtype", choices=_DTYPES, default=None,
                        help="parameter dtype (default: the HF config's dtype; FP8 weights "
                        "are dequantized to bfloat16 first)")
    parser.add_argument("--no-mtp", action="store_true",
                        help="leave DeepSeek-V3's multi-token-prediction layers out")


def add_megatron_to_hf_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("megatron_dir", help="a run's save_dir (its newest step), a training "
                        "step directory or a converted checkpoint, saved at any TP/PP/EP "
                        "layout")
    parser.add_argument("out_dir", help="Hugging Face directory to create")
    parser.add_argument("--hf-config", default=None,
                        help="the model's HF config.json (or its directory, whose tokenizer "
                        "files are copied too); default: hf_config.json in megatron_dir "
                        "(written by hf-to-megatron), else the config.json of the model the "
                        "run started from (its checkpoint.load), else one made from the "
                        "run's model section")
    parser.add_argument("--model-config", default=None,
                        help="r1mega YAML config whose model section describes the model "
                        "(a config.json is synthesized)")
    parser.add_argument("--dtype", choices=_DTYPES, default=None,
                        help="dtype of the written tensors (default: as stored)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest safetensors shard (default 5GB)")
    parser.add_argument("--no-mtp", action="store_true",
                        help="leave DeepSeek-V3's multi-token-prediction layers out")
    parser.add_argument("--fp8", action="store_true",
                        help="DeepSeek-V3: write the release's FP8 format (float8_e4m3fn "
                        "linear weights in 128x128 blocks with weight_scale_inv, "
                        "quantization_config in config.json)")


EXAMPLES = """examples:
  r1mega convert hf-to-megatron models/Qwen2.5-Math-7B runs/qwen7b/converted
  r1mega convert hf-to-megatron models/DeepSeek-V3-Base runs/v3/converted  # FP8 release
  r1mega convert hf-to-megatron models/ds-v3-from-transformers runs/v3/converted --no-mtp
  r1mega convert megatron-to-hf runs/qwen7b/rl/checkpoints runs/qwen7b/export
  r1mega convert megatron-to-hf runs/v3/rl/checkpoints runs/v3/export-fp8 --fp8

A Hugging Face directory can also be given to every command directly (checkpoint.load=DIR,
r1mega eval DIR, r1mega generate DIR): it is converted once into a cache.
"""


def add_convert_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The ``convert`` subcommand with its two directions."""
    convert = subparsers.add_parser(
        "convert", help="convert checkpoints between Hugging Face and Megatron",
        description="Convert checkpoints between Hugging Face safetensors and megatron-core "
        "distributed checkpoints (Llama, Qwen2, DeepSeek-V3).", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    directions = convert.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    add_hf_to_megatron_arguments(directions.add_parser(
        "hf-to-megatron", help="HF safetensors -> megatron distributed checkpoint"))
    add_megatron_to_hf_arguments(directions.add_parser(
        "megatron-to-hf", help="megatron distributed checkpoint -> HF safetensors"))
    return convert


def run_convert(args: argparse.Namespace) -> int:
    """Run a parsed ``convert`` command; 0 on success, 2 on a conversion error."""
    from r1mega.convert.errors import ConversionError

    try:
        if args.direction == "hf-to-megatron":
            from r1mega.convert.hf_to_megatron import convert_hf_to_megatron

            cfg = convert_hf_to_megatron(args.hf_dir, args.out_dir, dtype=args.dtype,
                                         include_mtp=not args.no_mtp)
        else:
            from r1mega.convert.megatron_to_hf import convert_megatron_to_hf

            cfg = convert_megatron_to_hf(args.megatron_dir, args.out_dir,
                                         hf_config=args.hf_config,
                                         model_config=args.model_config, dtype=args.dtype,
                                         max_shard_size=args.max_shard_size,
                                         include_mtp=not args.no_mtp, fp8=args.fp8)
    except ConversionError as err:
        print(f"r1mega convert: error: {err}", file=sys.stderr)
        return 2
    print(f"r1mega convert: wrote {args.out_dir} ({cfg.arch}, {cfg.num_layers} layers)")
    return 0


def main(direction: str, argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tools/convert_*.py`` scripts (one direction each)."""
    parser = argparse.ArgumentParser(prog=f"convert_{direction.replace('-', '_')}")
    if direction == "hf-to-megatron":
        add_hf_to_megatron_arguments(parser)
    else:
        add_megatron_to_hf_arguments(parser)
    args = parser.parse_args(argv)
    args.direction = direction
    from r1mega.cli import quiet_dependencies

    quiet_dependencies()
    return run_convert(args)
