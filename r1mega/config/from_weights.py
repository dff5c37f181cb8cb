"""The parts of a job config that the weights decide: model architecture and tokenizer.

When ``checkpoint.load`` names a Hugging Face model directory or a converted checkpoint
(``r1mega convert hf-to-megatron``), the architecture is read from its ``config.json``
(or the converted ``r1mega_model.yaml``) and the tokenizer and chat template from its
tokenizer files, so a config does not restate them: a YAML may leave ``model:`` out, and
where it states an architecture field the weights' value wins (weights of another shape
could not load). Training choices stay the config's: ``model.transformer_impl``,
``model.moe_aux_loss_coeff``, ``model.moe_router_bias_update_rate``,
``model.mtp_loss_scaling_factor``. A run's ``save_dir``, one of its steps and
``warm_start:`` keep the config's own model and tokenizer.

A DeepSeek-V3 directory whose ``config.json`` declares MTP layers it does not hold (what
``transformers``' ``save_pretrained`` writes) is used without MTP.

``rewards.reward_model.load`` takes the same kinds of model directory, holding a reward
model instead (:func:`reward_model_source`); each key refuses the other kind of model.

:func:`model_directory_config` is the whole job config of a model directory, which
``r1mega eval|generate`` use for an HF directory and ``r1mega convert hf-to-megatron``
stores beside the weights, with the sampling defaults of ``generation_config.json``.

Nothing here imports torch: the command line runs it before starting any process.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from r1mega.checkpointing.paths import (
    HF_CONFIG,
    MODEL_CONFIG,
    SourceKind,
    WeightSource,
    WeightSourceError,
    resolve_weight_source,
)
from r1mega.config.validate import ConfigError

#: ModelConfig fields that are training choices, not architecture: the config keeps them.
TRAINING_CHOICES = ("transformer_impl", "moe_aux_loss_coeff", "moe_router_bias_update_rate",
                    "mtp_loss_scaling_factor")
#: Files that make a directory a Hugging Face tokenizer (transformers' AutoTokenizer).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
GENERATION_CONFIG = "generation_config.json"


def hf_tensor_names(directory: Path) -> list[str]:
    """Tensor names of an HF checkpoint, from its index or safetensors headers only."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text())["weight_map"])
    names: list[str] = []
    for file in sorted(directory.glob("*.safetensors")):
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            names += [k for k in json.loads(f.read(size)) if k != "__metadata__"]
    return names


def declared_mtp_missing(directory: Path, config: dict[str, Any]) -> bool:
    """Whether ``config.json`` declares MTP layers whose tensors are not in the files."""
    declared = int(config.get("num_nextn_predict_layers") or 0)
    if not declared:
        return False
    first = int(config["num_hidden_layers"])
    layer = re.compile(r"model\.layers\.(\d+)\.")
    return not any((m := layer.match(n)) and int(m.group(1)) >= first
                   for n in hf_tensor_names(directory))


def _hf_model(directory: Path, key: str = "checkpoint.load") -> Any:
    from r1mega.convert.errors import ConversionError
    from r1mega.convert.hf_config import model_config_from_hf

    config = json.loads((directory / HF_CONFIG).read_text())
    try:
        return model_config_from_hf(config,
                                    include_mtp=not declared_mtp_missing(directory, config))
    except (ConversionError, KeyError) as err:
        raise ConfigError(f"{key}={directory}: {HF_CONFIG}: {err}") from None


def _stored_model(directory: Path) -> dict[str, Any]:
    """The ModelConfig fields a converted checkpoint stores (``r1mega_model.yaml``)."""
    stored = OmegaConf.load(directory / MODEL_CONFIG)
    return dict(OmegaConf.to_container(stored.get("model", stored), resolve=True))


def model_from_weights(source: WeightSource, key: str = "checkpoint.load"
                       ) -> dict[str, Any] | None:
    """The architecture fields ``source`` fixes, or None when the config's model stays."""
    if source.kind is SourceKind.HF:
        fields = dataclasses.asdict(_hf_model(source.path, key))
    elif source.kind is SourceKind.CHECKPOINT and (source.path / MODEL_CONFIG).is_file():
        fields = _stored_model(source.path)
    else:
        return None
    return {k: v for k, v in fields.items() if k not in TRAINING_CHOICES}


def has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def tokenizer_from_weights(source: WeightSource) -> dict[str, Any] | None:
    """``{type: hf, path: DIR}`` when ``source`` is a model directory with tokenizer
    files, else None."""
    if source.kind in (SourceKind.HF, SourceKind.CHECKPOINT) and has_tokenizer(source.path):
        return {"type": "hf", "path": str(source.path)}
    return None


def apply_weights(cfg: DictConfig) -> None:
    """Fill ``cfg.model`` and ``cfg.tokenizer`` from ``checkpoint.load`` (in place), after
    checking that it names weights (one line naming the key otherwise)."""
    load = cfg.checkpoint.load
    if not load:
        return
    try:
        source = resolve_weight_source(load)
    except WeightSourceError as err:
        raise ConfigError(f"checkpoint.load={load}: {err}") from None
    model = model_from_weights(source)
    if model is not None and model.get("head") == "scalar":
        raise ConfigError(f"checkpoint.load={load}: a reward model (*ForSequenceClassification"
                          ", one score per sequence), not a language model; a reward model "
                          "goes in rewards.reward_model.load")
    if model is not None:
        cfg.model = OmegaConf.merge(cfg.model, model)
    tokenizer = tokenizer_from_weights(source)
    if tokenizer is not None:
        cfg.tokenizer = OmegaConf.merge(cfg.tokenizer, tokenizer)
    elif source.kind is SourceKind.HF and cfg.tokenizer.type == "hf" and not cfg.tokenizer.path:
        raise ConfigError(f"checkpoint.load={load}: no tokenizer there (looked for "
                          f"{' or '.join(TOKENIZER_FILES)}); set tokenizer.path to the "
                          "model's tokenizer directory")


REWARD_MODEL_KEY = "rewards.reward_model.load"


def reward_model_source(load: str | Path) -> WeightSource:
    """The weights ``rewards.reward_model.load`` names, checked to be a reward model: a
    Hugging Face ``*ForSequenceClassification`` directory with one label (converted once
    into the job's cache, as an HF ``checkpoint.load`` is) or a converted checkpoint of one
    (``r1mega convert hf-to-megatron``: ``head: scalar`` in its ``r1mega_model.yaml``).

    Raises :class:`ConfigError`, one line naming the key, for anything else: a path that
    names no weights, a language model, a run or step of a training job (a policy), a
    classifier with several labels or of an unsupported architecture."""
    try:
        source = resolve_weight_source(load)
    except WeightSourceError as err:
        raise ConfigError(f"{REWARD_MODEL_KEY}={load}: {err}") from None
    model = model_from_weights(source, key=REWARD_MODEL_KEY)
    if model is None:
        raise ConfigError(
            f"{REWARD_MODEL_KEY}={load}: {source.describe()} is not a reward model: give a "
            "Hugging Face *ForSequenceClassification directory with one label, or its "
            f"conversion (`r1mega convert hf-to-megatron`, which writes {MODEL_CONFIG})")
    if model.get("head") != "scalar":
        raise ConfigError(
            f"{REWARD_MODEL_KEY}={load}: a language model ({model.get('arch')}, head: "
            f"{model.get('head', 'lm')}), not a reward model: a reward model is a "
            "*ForSequenceClassification with one label (head: scalar)")
    return source


def reward_model_weights(cfg: Any) -> WeightSource | None:
    """Before launch: the reward model's weights, when a ``data.sources`` entry is scored
    by one (``reward: reward_model``; None otherwise), checked by
    :func:`reward_model_source`."""
    if not any(s.reward == "reward_model" for s in cfg.data.sources):
        return None
    load = cfg.rewards.reward_model.load
    if not load:  # validate_config reports it, naming the sources
        return None
    return reward_model_source(load)


def _chat_template(directory: Path) -> bool:
    if (directory / "chat_template.jinja").is_file():
        return True
    config = directory / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))


def _sampling_defaults(directory: Path) -> dict[str, Any]:
    """``rollout`` defaults from ``generation_config.json`` (temperature, top-p/k, length)."""
    path = directory / GENERATION_CONFIG
    if not path.is_file():
        return {}
    gen = json.loads(path.read_text())
    out: dict[str, Any] = {}
    for key in ("temperature", "top_p", "top_k"):
        if gen.get(key) is not None:
            out[key] = gen[key]
    if gen.get("max_new_tokens"):
        out["max_new_tokens"] = int(gen["max_new_tokens"])
    return out


def model_directory_config(directory: str | Path, dtype: str | None = None) -> dict[str, Any]:
    """A complete job config for a model directory (HF or converted): the model and
    tokenizer from its files (see :func:`apply_weights`), ``data.template: chat`` when its
    tokenizer has a chat template (``r1_zero`` otherwise), sampling defaults from its
    ``generation_config.json``, parameters in ``dtype`` (float32 or bfloat16; default:
    float32 for a float32 checkpoint, else bfloat16), one process."""
    path = Path(directory)
    if dtype is None:
        dtype = "bfloat16"
        if (path / HF_CONFIG).is_file():
            config = json.loads((path / HF_CONFIG).read_text())
            if (config.get("dtype") or config.get("torch_dtype")) == "float32":
                dtype = "float32"
    chat = _chat_template(path)
    rollout: dict[str, Any] = {**_sampling_defaults(path), "engine": "colocated"}
    if chat:
        rollout["stop"] = []  # a chat model ends with its EOS token
    return {
        "tokenizer": {"type": "hf", "path": str(path)},
        "precision": {"params_dtype": dtype, "fp8": None},
        "data": {"template": "chat" if chat else "r1_zero"},
        "rollout": rollout,
        "rewards": {"specs": [{"name": "accuracy", "weight": 1.0}]},
        "checkpoint": {"load": str(path)},
        "launch": {"nproc_per_node": 1},
    }
