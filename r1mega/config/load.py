"""Load an r1mega config: schema defaults <- YAML files <- ``key=value`` overrides.

Why this wrapper instead of bare ``OmegaConf.merge``:

* every failure becomes one exception type, :class:`ConfigError`, whose message names the
  source (file or override) and the full dotted key, so CLIs can print it and exit
  instead of dumping an omegaconf traceback;
* omegaconf loses the key path inside lists of structured configs (``rewards.specs``)
  and reports a bare ``weight`` instead of ``rewards.specs[0].weight``; unknown keys are
  therefore checked here against the dataclass schema before merging;
* YAML files may inherit from others with a top-level ``defaults:`` list, which omegaconf
  alone does not support (Hydra does, but it is too heavy for a launcher that also runs
  under srun/torchrun).

The result is the omegaconf structured ``DictConfig`` (typed as :class:`R1MegaConfig` for
editors and type checkers), validated and set read-only so no rank can drift from the
others by mutating it. Use ``omegaconf.read_write(cfg)`` for deliberate edits.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union, cast

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from r1mega.config.schema import R1MegaConfig
from r1mega.config.validate import ConfigError, validate_config

__all__ = ["ConfigError", "load_config", "load_yaml_chain"]

DEFAULTS_KEY = "defaults"
PathLike = str | os.PathLike[str]


def _unwrap_optional(tp: Any) -> Any:
    """``Optional[X]`` -> ``X``; anything else unchanged."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _field_types(schema: type) -> dict[str, Any]:
    """Field name -> resolved annotation (the schema uses ``from __future__ import``)."""
    hints = typing.get_type_hints(schema)
    return {f.name: _unwrap_optional(hints[f.name]) for f in dataclasses.fields(schema)}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _list_item_dataclass(tp: Any) -> type | None:
    """``list[SomeDataclass]`` -> ``SomeDataclass``; otherwise None."""
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp) or (None,)
        item = _unwrap_optional(item)
        if _is_dataclass_type(item):
            return cast(type, item)
    return None


def _is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and value.strip().startswith("${")


def _unknown_key_message(source: str, prefix: str, key: str, valid: Sequence[str]) -> str:
    path = f"{prefix}{key}"
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    if close:
        hint = "did you mean " + " or ".join(f"'{prefix}{c}'" for c in close) + "?"
    else:
        section = prefix.rstrip(".") or "the top level"
        hint = f"valid keys under {section}: {', '.join(valid)}"
    return f"{source}: unknown key '{path}'; {hint}"


def _check_keys(raw: dict[Any, Any], schema: type, prefix: str, source: str) -> None:
    """Reject unknown keys and non-mapping sections with their full dotted path.

    ``raw`` is a plain container (interpolations unresolved). Lists of structured
    configs are also merged item by item here so type errors inside them carry the
    ``section.list[i].field`` path that omegaconf drops.
    """
    fields = _field_types(schema)
    for key, value in raw.items():
        key = str(key)
        path = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(_unknown_key_message(source, prefix, key, list(fields)))
        tp = fields[key]
        if value is None or _is_interpolation(value) or value == "???":
            continue
        if _is_dataclass_type(tp):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{source}: {path} must be a mapping of {tp.__name__} fields, "
                    f"got {type(value).__name__} {value!r}"
                )
            _check_keys(value, tp, f"{path}.", source)
            continue
        if typing.get_origin(tp) is list and not isinstance(value, list):
            per_index = isinstance(value, dict)  # what `a.list.0.x=...` parses into
            hint = " (lists are replaced whole; no per-index overrides)" if per_index else ""
            raise ConfigError(
                f"{source}: {path} must be a list, got {type(value).__name__} {value!r}{hint}"
            )
        item_type = _list_item_dataclass(tp)
        if item_type is None or not isinstance(value, list):
            continue
        for i, item in enumerate(value):
            item_path = f"{path}[{i}]"
            if _is_interpolation(item):
                continue
            if not isinstance(item, dict):
                raise ConfigError(
                    f"{source}: {item_path} must be a mapping of {item_type.__name__} "
                    f"fields, got {type(item).__name__} {item!r}"
                )
            _check_keys(item, item_type, f"{item_path}.", source)
            try:
                OmegaConf.merge(OmegaConf.structured(item_type), item)
            except OmegaConfBaseException as err:
                raise ConfigError(_describe(err, source, prefix=f"{item_path}.")) from None


def _describe(err: OmegaConfBaseException, source: str, prefix: str = "") -> str:
    """One-line message from an omegaconf error: source, full dotted key, reason."""
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    full_key = getattr(err, "full_key", None)
    if full_key:
        return f"{source}: {prefix}{full_key}: {reason}"
    return f"{source}: {reason}"


def load_yaml_chain(path: PathLike, _stack: tuple[Path, ...] = ()) -> Iterator[tuple[str, Any]]:
    """Yield ``(source, mapping)`` for ``path`` and its ``defaults:`` in merge order.

    A file's ``defaults:`` (a list of paths, or one path, relative to that file) are
    merged first, depth first and in order, then the file's own keys on top: the same
    "later wins" rule as the command line. Cycles are an error rather than a recursion
    limit crash.
    """
    file = Path(path)
    resolved = file.resolve()
    if resolved in _stack:
        chain = " -> ".join(str(p) for p in (*_stack, resolved))
        raise ConfigError(f"{file}: circular defaults: {chain}")
    if not file.is_file():
        included = f" (listed in defaults of {_stack[-1]})" if _stack else ""
        raise ConfigError(f"config file not found: {file}{included}")
    try:
        # omegaconf's loader (not yaml.safe_load) so 1e-4 is a float and duplicate keys fail.
        node = OmegaConf.load(file)
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        reason = " ".join(str(err).split())
        raise ConfigError(f"{file}: invalid YAML: {reason}") from None
    data = OmegaConf.to_container(node, resolve=False)
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: top level must be a mapping, got {type(data).__name__}")

    defaults = data.pop(DEFAULTS_KEY, None) or []
    if isinstance(defaults, str):
        defaults = [defaults]
    if not isinstance(defaults, list) or not all(isinstance(d, str) for d in defaults):
        raise ConfigError(f"{file}: {DEFAULTS_KEY} must be a list of YAML paths, got {defaults!r}")
    for parent in defaults:
        yield from load_yaml_chain(file.parent / parent, (*_stack, resolved))
    yield str(file), data


def _parse_override(override: str) -> dict[Any, Any]:
    """``a.b=value`` -> ``{"a": {"b": value}}`` with YAML typing of the value."""
    if not isinstance(override, str) or "=" not in override:
        raise ConfigError(
            f"malformed override {override!r}: expected key=value, e.g. train.lr=1e-5"
        )
    key = override.split("=", 1)[0].strip()
    if not key or key.startswith(("+", "~", ".")) or key.endswith(".") or ".." in key:
        raise ConfigError(
            f"malformed override {override!r}: expected a dotted key such as train.lr "
            f"(Hydra's +key/~key forms are not supported)"
        )
    try:
        parsed = OmegaConf.from_dotlist([override])
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        reason = str(err).strip().splitlines()[0]
        raise ConfigError(f"malformed override {override!r}: {reason}") from None
    return cast(dict[Any, Any], OmegaConf.to_container(parsed, resolve=False))


def _merge(cfg: DictConfig, raw: dict[Any, Any], source: str) -> DictConfig:
    _check_keys(raw, R1MegaConfig, "", source)
    try:
        return cast(DictConfig, OmegaConf.merge(cfg, raw))
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err, source)) from None
    except (TypeError, ValueError) as err:  # omegaconf lets a few plain errors through
        raise ConfigError(f"{source}: {err}") from None


def load_config(
    paths: PathLike | Mapping[str, Any] | Sequence[PathLike | Mapping[str, Any]],
    overrides: Sequence[str] = (),
    world_size: int | None = None,
) -> R1MegaConfig:
    """Build, check and freeze the job config.

    Args:
        paths: one YAML file or several, merged in order (later files win); a mapping
            stands for a YAML file's contents.
        overrides: ``dotted.key=value`` strings applied last, values parsed as YAML
            (``train.lr=1e-5``, ``precision.fp8=null``, ``train_layout.pp_layers=[3,2]``).
            Lists are replaced whole; there is no per-index override.
        world_size: number of ranks the job runs on; enables layout-tiling and batch
            checks (see :func:`validate_config`). None skips them.

    Returns:
        The structured, read-only omegaconf ``DictConfig`` (static type R1MegaConfig).

    Raises:
        ConfigError: unknown key, wrong type, missing required value, missing or
            malformed YAML file, malformed override, or a cross-field violation.
    """
    if isinstance(paths, (str, os.PathLike, Mapping)):
        paths = [paths]
    cfg = OmegaConf.structured(R1MegaConfig)
    for path in paths:
        # A mapping is a config made in memory (the job config of a model directory).
        chain = [("model directory config", dict(path))] if isinstance(path, Mapping) \
            else load_yaml_chain(path)
        for source, raw in chain:
            cfg = _merge(cfg, raw, source)
    for override in overrides:
        cfg = _merge(cfg, _parse_override(override), f"override {override!r}")

    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err, "interpolation")) from None
    # checkpoint.load must name weights; a model directory also fixes model/tokenizer.
    from r1mega.config.from_weights import apply_weights

    apply_weights(cfg)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            "missing required value(s): "
            + ", ".join(missing)
            + " (set them in a YAML file or as key=value overrides"
            + ("; or point checkpoint.load at a Hugging Face model directory, whose "
               "config.json describes the model)" if any(k.startswith("model.")
                                                          for k in missing) else ")"),
            [f"{key} is required" for key in missing],
        )

    validate_config(cfg, world_size)
    OmegaConf.set_readonly(cfg, True)
    return cast(R1MegaConfig, cfg)
