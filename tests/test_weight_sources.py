"""Which weights a path means, and how many processes a command starts (no model built).

* every kind of weights path resolves by the files it holds (a step, a weights-only
  checkpoint, a run's save_dir, a Hugging Face directory, ``warm_start:``), and anything
  else is refused naming what was looked for; the resolver imports no torch;
* ``--nproc N`` and ``--nproc=N`` start N local processes for train, sft, sample,
  distill, eval and generate, with the command line handed to the ranks untouched (and
  never parsed by torch's launcher); ``key=value`` overrides may follow options; under a
  launcher ``--nproc`` must match its world size.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from r1mega.checkpointing.paths import (
    CONFIG,
    META,
    SourceKind,
    WeightSourceError,
    resolve_weight_source,
)
from r1mega.config import ConfigError, load_config
from tests.distributed import ROOT


def _megatron_dir(path: Path, step: bool = False) -> Path:
    path.mkdir(parents=True)
    (path / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    if step:
        (path / META).write_text(json.dumps({"step": 1, "world_size": 1}))
    return path


def test_every_kind_of_weights_path_resolves_by_its_files(tmp_path: Path) -> None:
    converted = _megatron_dir(tmp_path / "converted")
    run = tmp_path / "run"
    step1 = _megatron_dir(run / "step_00000001", step=True)
    step2 = _megatron_dir(run / "step_00000002", step=True)
    _megatron_dir(run / "step_00000003.partial")  # a save that never completed
    (run / "latest").write_text("step_00000002")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors.index.json").write_text("{}")

    expected = {converted: (SourceKind.CHECKPOINT, converted), run: (SourceKind.RUN, step2),
                step1: (SourceKind.STEP, step1), hf: (SourceKind.HF, None)}
    for path, (kind, checkpoint) in expected.items():
        source = resolve_weight_source(str(path))
        assert (source.kind, source.checkpoint) == (kind, checkpoint), path
    warm = resolve_weight_source("warm_start:runs/base")
    assert (warm.kind, warm.path, warm.checkpoint) == (SourceKind.WARM_START,
                                                       Path("runs/base"), None)

    (hf / "model.safetensors.index.json").unlink()  # a config.json alone is not a model
    (run / "step_00000003.partial" / "metadata.json").unlink()
    for path, needle in ((hf, "no config.json with model.safetensors"),
                         (tmp_path / "missing", "does not exist"),
                         (run / "step_00000003.partial", "holds no r1mega checkpoint")):
        with pytest.raises(WeightSourceError, match=needle):
            resolve_weight_source(str(path))
    only_partial = tmp_path / "crashed"
    _megatron_dir(only_partial / "step_00000001.partial")
    with pytest.raises(WeightSourceError, match=r"step_00000001\.partial never completed"):
        resolve_weight_source(str(only_partial))


def test_resolver_and_command_line_parsing_import_no_torch() -> None:
    code = ("import sys; import r1mega.checkpointing.paths, r1mega.cli; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- --nproc and overrides

JOBS = {"train": "configs/tiny_cpu.yaml", "sft": "configs/sft_tiny_cpu.yaml",
        "sample": "configs/sample_tiny_cpu.yaml", "distill": "configs/distill_tiny_cpu.yaml"}


@pytest.fixture(scope="module")
def fake_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory whose step holds the tiny config (no weights: nothing loads them)."""
    run = tmp_path_factory.mktemp("run")
    step = _megatron_dir(run / "step_00000001", step=True)
    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", ["checkpoint.load=null"])
    (step / CONFIG).write_text(OmegaConf.to_yaml(cfg))
    return run


def _launches(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> tuple[int, list[str]]:
    import r1mega.launch
    import r1mega.preflight
    from r1mega.cli import main

    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(ROOT)
    started: list[tuple[int, list[str]]] = []
    monkeypatch.setattr(r1mega.launch, "relaunch_local",
                        lambda n, args, port=None: started.append((n, list(args))) or 0)
    # distill's dataset is written by an earlier stage (rejection sampling): not here.
    monkeypatch.setattr(r1mega.preflight, "check_before_launch", lambda cfg, command: None)
    assert main(argv) == 0
    assert len(started) == 1, argv
    return started[0]


@pytest.mark.parametrize("form", ["space", "equals"])
@pytest.mark.parametrize("command", [*JOBS, "eval", "generate"])
def test_nproc_starts_that_many_ranks_with_the_command_line_untouched(
        monkeypatch: pytest.MonkeyPatch, fake_checkpoint: Path, command: str,
        form: str) -> None:
    target = JOBS.get(command, str(fake_checkpoint))
    nproc = ["--nproc", "2"] if form == "space" else ["--nproc=2"]
    extra = ["--prompt", "hi", "--n", "2"] if command == "generate" else []
    # Overrides before and after the options, and the world size's layouts for eval.
    argv = [command, target, "train.seed=5", *nproc, *extra, "train.seed=7"]
    n, child_argv = _launches(monkeypatch, argv)
    assert n == 2 and child_argv == argv


def test_overrides_after_options_keep_their_order() -> None:
    from r1mega.cli import parse_args

    args = parse_args(["eval", "CK", "a.b=1", "--k", "2", "c.d=2", "--nproc=2", "a.b=3"])
    assert (args.k, args.nproc, args.overrides) == (2, 2, ["a.b=1", "c.d=2", "a.b=3"])
    with pytest.raises(SystemExit):
        parse_args(["convert", "hf-to-megatron", "a", "b", "x=1"])
    with pytest.raises(SystemExit):
        parse_args(["train", "c.yaml", "--bogus"])


def test_under_a_launcher_nproc_must_match_its_world(monkeypatch: pytest.MonkeyPatch) -> None:
    from r1mega.cli import parse_args, processes

    for env in ({"RANK": "0", "WORLD_SIZE": "2"}, {"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}):
        for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
            monkeypatch.delenv(var, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert processes(parse_args(["train", "c.yaml"]), 1) == (2, False)
        assert processes(parse_args(["generate", "ck", "--nproc=2"]), 1) == (2, False)
        with pytest.raises(ConfigError, match="--nproc 3 does not match the 2 process"):
            processes(parse_args(["eval", "ck", "--nproc", "3"]), 1)


def test_launcher_never_parses_the_jobs_arguments() -> None:
    """torch's launcher reads --nproc / --n as ambiguous abbreviations of its own options;
    after "--" it hands them over."""
    from torch.distributed.run import parse_args as torchrun_args

    argv = ["generate", "ck", "--nproc", "2", "--n", "2"]
    with pytest.raises(SystemExit):
        torchrun_args(["--nproc-per-node", "2", "--module", "r1mega.cli", *argv])
    parsed = torchrun_args(["--nproc-per-node", "2", "--module", "r1mega.cli", "--", *argv])
    assert parsed.training_script_args == argv
def test_checkpoint_load_is_checked_before_launch_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"checkpoint.load={tmp_path}/nowhere: .*does not "
                       "exist"):
        load_config(ROOT / "configs" / "tiny_cpu.yaml", [f"checkpoint.load={tmp_path}/nowhere"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="checkpoint.load=.*holds no r1mega checkpoint or "
                       "model"):
        load_config(ROOT / "configs" / "tiny_cpu.yaml", [f"checkpoint.load={tmp_path}/empty"])




def _hf_dir(path: Path, architecture: str, **fields: object) -> Path:
    """A Hugging Face directory as far as the checks before launch read it (config.json;
    the weights file only has to exist)."""
    path.mkdir(parents=True)
    config = {"architectures": [architecture], "model_type": "qwen2", "vocab_size": 512,
              "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
              "tie_word_embeddings": False, **fields}
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(b"")
    return path


def test_reward_model_is_checked_before_launch_by_name(monkeypatch: pytest.MonkeyPatch,
                                                       fake_checkpoint: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    """`r1mega train|sample` with a reward-model source refuse a wrong
    rewards.reward_model.load in one line naming the key, before any process starts (and
    before converting anything); checkpoint.load refuses a reward model."""
    import r1mega.launch
    from r1mega.cli import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(r1mega.launch, "relaunch_local",
                        lambda *a, **k: pytest.fail("launched despite a bad reward model"))
    lm = _hf_dir(tmp_path / "lm", "Qwen2ForCausalLM")
    rm = _hf_dir(tmp_path / "rm", "Qwen2ForSequenceClassification", num_labels=1)
    three = _hf_dir(tmp_path / "three", "Qwen2ForSequenceClassification",
                    id2label={"0": "a", "1": "b", "2": "c"})
    cases = {tmp_path / "nowhere": "does not exist",
             lm: r"a language model \(qwen2, head: lm\), not a reward model",
             fake_checkpoint: "is not a reward model: give a Hugging Face",
             three: "config.json has 3 labels"}
    runs = [("train", path, why) for path, why in cases.items()] + [("sample", lm, "a language")]
    for command, path, why in runs:
        argv = [command, "configs/r1_stage2_tiny_cpu.yaml", "checkpoint.load=null",
                f"rewards.reward_model.load={path}", "sample.output_dir=unused", "--nproc", "2"]
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err[0] == "r1mega: invalid configuration:"
        assert len(err) == 2 and re.match(rf"rewards.reward_model.load={path}: .*{why}",
                                          err[1]), err
    with pytest.raises(ConfigError, match=rf"checkpoint.load={rm}: a reward model .*goes in "
                       "rewards.reward_model.load"):
        load_config(ROOT / "configs" / "tiny_cpu.yaml", [f"checkpoint.load={rm}"])
