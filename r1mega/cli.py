"""`r1mega` command line: train, plan, convert, generate, eval.

Configs are YAML files (see ``configs/``) plus ``key=value`` overrides (anywhere after
the positional argument), validated before any process starts. A command started from a
shell spawns its local processes itself (``--nproc N``, default ``launch.nproc_per_node``
for jobs, 1 for eval/generate); under torchrun or srun it runs as the rank it was given,
and ``--nproc`` (if given) must match the launcher's world size.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

from r1mega.config import ConfigError, load_config
from r1mega.convert.cli import add_convert_parser, run_convert
from r1mega.convert.errors import ConversionError
from r1mega.planner.report import add_plan_arguments, run_plan

#: Multi-process jobs run from a config: command -> help; every rank calls the entry point.
JOBS_HELP = {
    "train": "GRPO reinforcement learning (R1-Zero; stage-2 RL with a stage-2 config)",
    "sft": "supervised fine-tuning (cold start, the large SFT stage)",
    "sample": "rejection sampling: k samples per prompt, keep the accepted, write SFT data",
    "distill": "distillation: SFT of a (smaller) student on a teacher's sampled data",
}
JOB_ENTRIES = {
    "train": ("r1mega.trainer", "run_training"),
    "sft": ("r1mega.sft.trainer", "run_sft"),
    "sample": ("r1mega.rejection.sampler", "run_sampling"),
    "distill": ("r1mega.sft.trainer", "run_distill"),
}


#: Commands whose positional arguments end with ``key=value`` config overrides.
OVERRIDE_COMMANDS = (*JOB_ENTRIES, "plan", "generate", "eval")
_OVERRIDE = re.compile(r"[A-Za-z_][\w.\[\]]*=")


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
    for name, text in JOBS_HELP.items():
        job = sub.add_parser(name, help=text)
        _add_config_args(job)
        job.add_argument("--nproc", type=int, default=None,
                         help="local processes to start (default: launch.nproc_per_node; "
                         "under torchrun/srun: the launcher's)")
    plan = sub.add_parser("plan", help="per-GPU memory and step time of a config's layouts")
    _add_config_args(plan)
    add_plan_arguments(plan)
    add_convert_parser(sub)
    gen = sub.add_parser("generate", help="sample completions from a checkpoint")
    gen.add_argument("checkpoint", help="a run's save_dir (newest step), a step directory, a "
                     "converted checkpoint or a Hugging Face model directory")
    gen.add_argument("overrides", nargs="*", metavar="key=value",
                     help="config overrides (e.g. layouts when --nproc > 1)")
    gen.add_argument("--prompt", action="append", default=[],
                     help="a prompt (repeat for several)")
    gen.add_argument("--prompts-file", default=None, help="a text file, one prompt per line")
    gen.add_argument("--n", type=int, default=1, help="completions per prompt")
    gen.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--max-new-tokens", type=int, default=None)
    gen.add_argument("--template", default=None, help="r1_zero | chat | none "
                     "(default: the run's data.template)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--output", default=None, help="write completions as JSONL here")
    gen.add_argument("--nproc", type=int, default=None,
                     help="local processes (default 1; under torchrun/srun: the launcher's)")
    ev = sub.add_parser("eval", help="evaluate a checkpoint (pass@1 over k samples, greedy)")
    ev.add_argument("checkpoint", help="a run's save_dir (newest step), a step directory, a "
                    "converted checkpoint or a Hugging Face model directory")
    ev.add_argument("overrides", nargs="*", metavar="key=value",
                    help="config overrides (e.g. layouts when --nproc > 1)")
    ev.add_argument("--data", default=None, help="JSONL/Parquet file or builtin:<task> "
                    "(default: the run's data.eval_path)")
    ev.add_argument("--k", type=int, default=4, help="samples per problem for pass@1")
    ev.add_argument("--temperature", type=float, default=0.6)
    ev.add_argument("--top-p", type=float, default=0.95)
    ev.add_argument("--max-new-tokens", type=int, default=None)
    ev.add_argument("--limit", type=int, default=None, help="evaluate the first N problems")
    ev.add_argument("--batch-size", type=int, default=64, help="samples per generation batch")
    ev.add_argument("--output", default=None, help="write the result as JSON here")
    ev.add_argument("--nproc", type=int, default=None,
                    help="local processes (default 1; under torchrun/srun: the launcher's)")
    return parser


def _check_rewards(cfg: object) -> None:
    """Reward plug-in parameters are checked by the plug-ins themselves; build them once
    (no worker process starts until a first batch) so a typo fails before launch."""
    from r1mega.rewards import RewardFunction

    RewardFunction.from_config(cfg.rewards).close()


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse a command line; ``key=value`` overrides may follow options too
    (``eval CKPT --k 2 train.seed=3``), in the order given."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if _OVERRIDE.match(a)]
    if len(overrides) != len(extra) or (overrides and args.command not in OVERRIDE_COMMANDS):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def launcher_world_size() -> int | None:
    """The world size torchrun or srun started, or None when started from a shell."""
    from r1mega.launch import under_launcher

    if not under_launcher():
        return None
    env = os.environ
    return int(env["WORLD_SIZE"] if "WORLD_SIZE" in env else env["SLURM_NTASKS"])


def processes(args: argparse.Namespace, default: int) -> tuple[int, bool]:
    """(world size of the job, whether this process must start it): ``--nproc`` or
    ``default`` local processes from a shell; the launcher's under torchrun/srun."""
    world = launcher_world_size()
    if world is not None:
        if args.nproc is not None and args.nproc != world:
            raise ConfigError(f"--nproc {args.nproc} does not match the {world} process(es) "
                              "the launcher started; drop --nproc under torchrun/srun")
        return world, False
    nproc = args.nproc if args.nproc is not None else default
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: need at least one process")
    return nproc, nproc > 1


def _run_job(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from r1mega.launch import LAUNCHER_PID_ENV, relaunch_local, run_rank, under_launcher
    from r1mega.preflight import check_before_launch

    if not under_launcher():
        # Validate once in the parent so a bad config fails before any process starts.
        probe = load_config(args.config, args.overrides)
        world_size, spawn = processes(args, probe.launch.nproc_per_node)
        load_config(args.config, args.overrides, world_size=world_size)
        scores = args.command in ("train", "sample")  # the jobs that score responses
        if scores:
            _check_rewards(probe)
        check_before_launch(probe, args.command)  # data, vocabulary, rollout budget
        from r1mega.checkpointing.hf_cache import prepare_weights

        # HF directories (checkpoint.load, the reward model): converted once, before the
        # ranks start; the reward model's path is checked here.
        prepare_weights(probe, reward_model=scores)
        if spawn:
            return relaunch_local(world_size, list(argv), port=None)
    else:
        world_size, _ = processes(args, 1)
    cfg = load_config(args.config, args.overrides, world_size=world_size)
    if under_launcher() and LAUNCHER_PID_ENV not in os.environ:
        check_before_launch(cfg, args.command)  # srun / torchrun: before any pretraining
    import importlib

    module, function = JOB_ENTRIES[args.command]
    job = getattr(importlib.import_module(module), function)
    if under_launcher():
        job(cfg)  # main() runs every rank under run_rank
        return 0
    return run_rank(lambda: job(cfg))  # one process, no launcher: the same one-line errors


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


_SINGLE_PROCESS_LAYOUT = [
    f"{layout}.{key}={value}"
    for layout in ("train_layout", "generation_layout")
    for key, value in (("tp", 1), ("pp", 1), ("ep", 1), ("etp", 1), ("cp", 1),
                       ("pp_layers", "null"), ("sequence_parallel", "false"))
] + ["launch.nproc_per_node=1"]


def _checkpoint_job(path_arg: str, command: str) -> tuple[object, str] | None:
    """(the job config to start from, the weights to load) for ``r1mega eval|generate
    PATH``: a run (its newest step) or one step with the config it was trained with; a
    converted checkpoint or a Hugging Face directory with the config its files make
    (:func:`~r1mega.config.from_weights.model_directory_config`). None (reported) when
    ``path_arg`` is none of these."""
    from r1mega.checkpointing.paths import (
        CONFIG,
        MODEL_CONFIG,
        SourceKind,
        WeightSourceError,
        resolve_weight_source,
    )
    from r1mega.config.from_weights import model_directory_config

    try:
        source = resolve_weight_source(path_arg)
    except WeightSourceError as err:
        print(f"r1mega {command}: {err}", file=sys.stderr)
        return None
    if source.config_file is not None:
        return source.config_file, str(source.checkpoint)
    if source.kind is SourceKind.HF or (source.path / MODEL_CONFIG).is_file():
        return model_directory_config(source.path), path_arg
    print(f"r1mega {command}: {path_arg} holds no r1mega checkpoint ({CONFIG} missing, and "
          f"no model description: {MODEL_CONFIG} or config.json)", file=sys.stderr)
    return None


def _checkpoint_config(args: argparse.Namespace, base: object, weights: str
                       ) -> tuple[object, int, bool]:
    """(the config of an eval/generate job on ``weights``, world size, whether to start
    the processes here): one process unless --nproc is given or a launcher started
    more. An HF directory is converted here, before any rank starts."""
    from r1mega.checkpointing.hf_cache import prepare_weights

    world, spawn = processes(args, 1)
    overrides = ([f"checkpoint.load={weights}"] + ([] if args.nproc else _SINGLE_PROCESS_LAYOUT)
                 + list(args.overrides))
    cfg = load_config(base, overrides, world_size=world)
    if launcher_world_size() is None:
        prepare_weights(cfg)
    return cfg, world, spawn


def _eval(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Evaluate a checkpoint; its config comes from the checkpoint directory."""
    from r1mega.launch import relaunch_local

    job = _checkpoint_job(args.checkpoint, "eval")
    if job is None:
        return 2
    cfg, nproc, spawn = _checkpoint_config(args, *job)
    if spawn:
        return relaunch_local(nproc, list(argv))
    from r1mega.evaluation import run_eval

    run_eval(cfg, job[1], args.data, args.k, args.temperature, args.top_p,
             args.max_new_tokens, args.limit, args.batch_size, args.output)
    return 0


def _generate(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Sample completions from a checkpoint with the rollout engine."""
    from r1mega.launch import relaunch_local

    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        print("r1mega generate: give --prompt TEXT or --prompts-file FILE", file=sys.stderr)
        return 2
    job = _checkpoint_job(args.checkpoint, "generate")
    if job is None:
        return 2
    cfg, nproc, spawn = _checkpoint_config(args, *job)
    if spawn:
        return relaunch_local(nproc, list(argv))
    from r1mega.generation import run_generate
    from r1mega.rollout.types import SamplingParams

    params = SamplingParams(max_new_tokens=args.max_new_tokens or cfg.rollout.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    run_generate(cfg, job[1], prompts, args.n, params, args.template or cfg.data.template,
                 args.seed, args.output)
    return 0


def _dispatch(args: argparse.Namespace, argv: Sequence[str], *,
              config_errors: bool = True) -> int:
    """Run the command; with ``config_errors`` a ConfigError becomes the usual message and
    exit status 2 (a rank leaves it to :func:`r1mega.launch.run_rank` instead)."""
    try:
        if args.command in JOB_ENTRIES:
            return _run_job(args, argv)
        if args.command == "convert":
            return run_convert(args)
        if args.command == "eval":
            return _eval(args, argv)
        if args.command == "generate":
            return _generate(args, argv)
        return run_plan(args)
    except ConfigError as err:
        if not config_errors:
            raise
        print(f"r1mega: invalid configuration:\n{err}", file=sys.stderr)
        return 2
    except ConversionError as err:
        print(f"r1mega: {err}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_dependencies()
    args = parse_args(argv)
    from r1mega.launch import run_rank, under_launcher

    if under_launcher():
        # A rank: dies with its launcher; an error is reported once, not as a traceback.
        codes: list[int] = []
        run_rank(lambda: codes.append(_dispatch(args, argv, config_errors=False)))
        return codes[0] if codes else 0
    return _dispatch(args, argv)


if __name__ == "__main__":
    sys.exit(main())
