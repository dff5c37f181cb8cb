"""`r1mega` command line: train, plan, convert, generate, eval.

Configs are YAML files (see ``configs/``) plus ``key=value`` overrides, validated before
any process starts. `r1mega train` started from a shell spawns the configured number of
local processes itself; under torchrun or srun it runs as the given rank.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from r1mega.config import ConfigError, load_config

NOT_YET = {
    "plan": "the memory/step-time planner for both layouts",
    "convert": "Hugging Face <-> Megatron checkpoint conversion",
    "generate": "the colocated rollout engine",
    "eval": "pass@1 evaluation of a checkpoint",
}


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file (e.g. configs/tiny_cpu.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.steps=10 train_layout.tp=2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="r1mega",
        description="GRPO (DeepSeek-R1-Zero style) reinforcement learning on Megatron-Core.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = sub.add_parser("train", help="run a training job from a config")
    _add_config_args(train)
    train.add_argument("--nproc", type=int, default=None,
                       help="local processes to start (default: launch.nproc_per_node)")
    plan = sub.add_parser("plan", help="per-GPU memory and step time of a config's layouts")
    _add_config_args(plan)
    sub.add_parser("convert", help="convert checkpoints between Hugging Face and Megatron")
    sub.add_parser("generate", help="sample completions from a checkpoint")
    sub.add_parser("eval", help="evaluate a checkpoint (pass@1 over k samples)")
    return parser


def _check_rewards(cfg: object) -> None:
    """Reward plug-in parameters are checked by the plug-ins themselves; build them once
    (no worker process starts until a first batch) so a typo fails before launch."""
    from r1mega.rewards import RewardFunction

    RewardFunction.from_config(cfg.rewards).close()


def _train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from r1mega.launch import relaunch_local, under_launcher

    nproc = args.nproc
    if not under_launcher():
        # Validate once in the parent so a bad config fails before any process starts.
        probe = load_config(args.config, args.overrides)
        nproc = nproc or probe.launch.nproc_per_node
        load_config(args.config, args.overrides, world_size=nproc)
        _check_rewards(probe)
        if nproc > 1:
            child_argv = [a for a in argv if not a.startswith("--nproc")]
            return relaunch_local(nproc, child_argv, port=None)
    world_size = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", nproc or 1)))
    cfg = load_config(args.config, args.overrides, world_size=world_size)
    from r1mega.trainer import run_training

    run_training(cfg)
    return 0


def quiet_dependencies() -> None:
    """Silence dependency chatter (missing-apex notices, deprecations) on the console.

    megatron-core warns at import about every optional CUDA extension it falls back from;
    on CPU that is a screenful per rank before the first progress line. Set
    R1MEGA_VERBOSE=1 to see it.
    """
    if os.environ.get("R1MEGA_VERBOSE"):
        return
    import logging
    import warnings

    for module in (r"megatron\..*", r"torch\..*", r"transformer_engine\..*"):
        warnings.filterwarnings("ignore", category=UserWarning, module=module)
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
    for name in ("megatron", "torch.utils.cpp_extension", "torch.distributed.elastic"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_dependencies()
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return _train(args, argv)
        if args.command == "plan":
            load_config(args.config, args.overrides)
        print(f"r1mega {args.command}: not implemented yet ({NOT_YET[args.command]})")
        return 2
    except ConfigError as err:
        print(f"r1mega: invalid configuration:\n{err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
