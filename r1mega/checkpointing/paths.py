"""Which weights a path means: the one resolver of weight sources, without torch.

Every command that takes weights (``checkpoint.load``, ``r1mega eval PATH``,
``r1mega generate PATH``, the reward model, the exporter) accepts the same kinds of path,
told apart by the files they hold:

========================  ==========================================================
kind                      what it is (and the files that identify it)
========================  ==========================================================
``step``                  one step of a training run: a megatron distributed checkpoint
                          (``metadata.json``) completed by ``r1mega_meta.json``
``checkpoint``            weights only: a converted model (``r1mega convert
                          hf-to-megatron``) or the tiny base model (``metadata.json``)
``run``                   a run's ``checkpoint.save_dir``: its newest complete step
                          (``latest``, ``step_XXXXXXXX/``), so one stage's ``save_dir``
                          is the next stage's ``checkpoint.load``
``hf``                    a Hugging Face model directory (``config.json`` and
                          ``model.safetensors`` or ``model.safetensors.index.json``),
                          converted once into a cache before it is loaded
``warm_start``            ``warm_start:DIR``: the tiny base model the demo configs start
                          from, pretrained into DIR on first use
========================  ==========================================================

It also owns the names of a run's directory layout (step directories, ``latest``, the
files beside the weights), so the checkpoint writer (:mod:`.train_state`) and the
weight loader (:mod:`.model_io`) both depend on it and not on each other. Nothing here
imports torch: the command line resolves and validates paths before it starts any
process.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path

META = "r1mega_meta.json"  # written last into a step directory: it is complete
CONFIG = "r1mega_config.yaml"  # the job config stored beside the weights
MODEL_CONFIG = "r1mega_model.yaml"  # a converted model's ModelConfig (``model:`` section)
LATEST = "latest"  # names the newest complete step directory of a run
MEGATRON_METADATA = "metadata.json"  # every megatron distributed checkpoint has it
HF_CONFIG = "config.json"
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
WARM_START = "warm_start:"

# A step being re-saved: the old copy, until the new one has the step's name.
REPLACED = ".replaced"
# A step that failed its integrity check: kept for inspection, never loaded.
CORRUPT = ".corrupt"

_STEP_DIR = re.compile(r"step_(\d{8})")


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def complete_steps(root: Path) -> list[Path]:
    """Finished step directories, oldest first. A ``step_N.replaced`` (a re-save
    interrupted between its two renames) stands in for a missing ``step_N``;
    ``.partial`` and ``.corrupt`` directories never count."""
    by_step: dict[int, Path] = {}
    for path in Path(root).glob("step_*"):
        match = _STEP_DIR.fullmatch(path.name.removesuffix(REPLACED))
        if match is None or not path.is_dir() or not (path / META).exists():
            continue
        step = int(match.group(1))
        if step not in by_step or by_step[step].name.endswith(REPLACED):
            by_step[step] = path
    return [by_step[s] for s in sorted(by_step)]


def find_latest_checkpoint(root: str | Path | None) -> Path | None:
    """The newest complete checkpoint under ``root`` (never a partial one), or None.
    (``latest`` names it too, but can lag behind a save killed before updating it.)"""
    if root is None or not Path(root).is_dir():
        return None
    complete = complete_steps(Path(root))
    return complete[-1] if complete else None


def is_megatron_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MEGATRON_METADATA).is_file()


def is_hf_model_dir(path: str | Path) -> bool:
    """A Hugging Face model directory: ``config.json`` plus safetensors weights."""
    p = Path(path)
    return (p / HF_CONFIG).is_file() and any((p / name).is_file() for name in HF_WEIGHT_FILES)


class SourceKind(enum.Enum):
    STEP = "step"
    CHECKPOINT = "checkpoint"
    RUN = "run"
    HF = "hf"
    WARM_START = "warm_start"


class WeightSourceError(ValueError):
    """A path that names no weights; the message says what was looked for."""


@dataclass(frozen=True)
class WeightSource:
    """What a weights path means.

    ``checkpoint`` is the megatron distributed checkpoint to load: the path itself, a
    run's newest step, or ``None`` until the job has made it (an HF directory's
    conversion, a warm start's pretraining)."""

    spec: str
    kind: SourceKind
    path: Path
    checkpoint: Path | None

    @property
    def config_file(self) -> Path | None:
        """The job config stored beside the weights (``r1mega_config.yaml``), if any."""
        if self.checkpoint is None or not (self.checkpoint / CONFIG).is_file():
            return None
        return self.checkpoint / CONFIG

    def describe(self) -> str:
        if self.kind is SourceKind.RUN:
            return f"{self.path} (newest step: {self.checkpoint.name})"  # type: ignore[union-attr]
        if self.kind is SourceKind.HF:
            return f"{self.path} (Hugging Face model)"
        return self.spec if self.kind is SourceKind.WARM_START else str(self.path)


def not_weights_message(path: Path) -> str:
    """Why ``path`` is none of the accepted kinds, naming what was looked for."""
    if not path.exists():
        return f"{path} does not exist"
    if not path.is_dir():
        return f"{path} is a file, not a checkpoint directory"
    partial = [p.name for p in path.glob("step_*.partial")]
    hint = f" ({', '.join(sorted(partial))} never completed)" if partial else ""
    return (f"{path} holds no r1mega checkpoint or model: no {MEGATRON_METADATA} (a megatron "
            f"checkpoint), no complete step_* directory (a run's checkpoint.save_dir){hint}, "
            f"no {HF_CONFIG} with {' or '.join(HF_WEIGHT_FILES)} (a Hugging Face model)")


def resolve_weight_source(spec: str | Path) -> WeightSource:
    """The :class:`WeightSource` ``spec`` names; :class:`WeightSourceError` if none."""
    text = str(spec)
    if text.startswith(WARM_START):
        directory = text[len(WARM_START):]
        if not directory:
            raise WeightSourceError(f"{text!r}: name the base model's directory, "
                                    f"e.g. {WARM_START}runs/tiny_base")
        return WeightSource(text, SourceKind.WARM_START, Path(directory), None)
    path = Path(text)
    if is_megatron_checkpoint(path):
        kind = SourceKind.STEP if (path / META).is_file() else SourceKind.CHECKPOINT
        return WeightSource(text, kind, path, path)
    if is_hf_model_dir(path):
        return WeightSource(text, SourceKind.HF, path, None)
    latest = find_latest_checkpoint(path)
    if latest is not None:
        return WeightSource(text, SourceKind.RUN, path, latest)
    raise WeightSourceError(not_weights_message(path))


__all__ = [
    "CONFIG", "CORRUPT", "HF_CONFIG", "HF_WEIGHT_FILES", "LATEST", "META", "MEGATRON_METADATA",
    "MODEL_CONFIG", "REPLACED",
    "WARM_START", "SourceKind", "WeightSource", "WeightSourceError", "complete_steps",
    "find_latest_checkpoint", "is_hf_model_dir", "is_megatron_checkpoint",
    "not_weights_message", "resolve_weight_source", "step_dir",
]
