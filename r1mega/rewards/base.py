"""The reward plug-in interface: inputs, results, the base class and parameter checking.

A reward is a class registered under a name (see :mod:`r1mega.rewards.registry`) and built
from the ``params`` dict of one ``rewards.specs[i]`` entry. It implements :meth:`Reward.score`
for one sample. Scoring always happens in worker processes
(:class:`r1mega.rewards.runner.RewardRunner`) under a per-sample time budget
(:meth:`Reward.budget_s`): a sample that runs past it scores 0 and is counted, whatever the
reward's code does. The plug-in objects are sent to the workers once, so they hold
configuration, not processes or open files.

Each reward declares its parameters as a small dataclass (``Params``). The base class
checks the user's dict against it before anything runs, so a typo in a YAML file fails at
start-up with the full dotted key (``rewards.specs[1].params.taget``) and the valid names,
instead of being silently ignored for a whole training run.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Self, Union

__all__ = ["Reward", "RewardInput", "RewardResult", "parse_params"]


@dataclass(slots=True)
class RewardInput:
    """One rollout to score.

    ``answer`` is the ground truth (``None`` when the task has none, e.g. code tasks that
    are judged by tests only); ``metadata`` carries task-specific data such as
    ``{"tests": [{"input": ..., "output": ...}]}`` for code; ``source`` names the dataset
    row (``file:line``) so warnings about a row can point at it.
    """

    prompt: str
    response: str
    answer: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = ""


@dataclass(slots=True)
class RewardResult:
    """A score and why it is what it is.

    ``info`` explains zero scores that are not the policy's fault, so the trainer can count
    and log them: ``{"timeout": True}``, ``{"error": "..."}``, ``{"no_answer": True}``.
    """

    score: float
    info: dict[str, Any] = field(default_factory=dict)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    ok = False
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ValueError:
                continue
    elif origin is Literal:
        ok = value in typing.get_args(tp)
    elif tp is type(None):
        ok = value is None
    elif tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        ok = isinstance(value, str)
    elif origin is not None:
        ok = isinstance(value, origin)
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise ValueError(f"{key}: expected {_describe(tp)}, got {value!r}")
    return value


def parse_params[P](schema: type[P], params: Mapping[str, Any] | None, where: str) -> P:
    """Build the ``schema`` dataclass from a user dict, naming bad keys as ``where.key``.

    Unknown keys are errors (with a closest-match suggestion) rather than ignored: a
    misspelt ``all_or_nothing`` would otherwise silently change the reward for a whole run.
    """
    params = dict(params or {})
    fields = [f.name for f in dataclasses.fields(schema)]  # type: ignore[arg-type]
    unknown = [k for k in params if k not in fields]
    if unknown:
        problems = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {where}.{close[0]}?)" if close else ""
            problems.append(f"unknown parameter {where}.{key}{hint}")
        valid = ", ".join(fields) if fields else "none"
        raise ValueError("; ".join(problems) + f"; valid parameters: {valid}")
    hints = typing.get_type_hints(schema)
    values = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in params.items()}
    return schema(**values)


class Reward(ABC):
    """Base class of every reward plug-in.

    Subclasses set ``Params`` (a dataclass of their parameters with defaults) and implement
    :meth:`score`. ``timeout_s`` is the global ``rewards.timeout_s`` (the per-sample budget
    unless a reward computes its own) and ``workers`` the global ``rewards.workers`` (the
    scoring processes of a standalone call). ``where`` is the config path of the params
    dict, used in error messages.
    """

    name: ClassVar[str] = ""  # set by @register_reward

    @dataclass
    class Params:
        pass

    def __init__(
        self,
        params: Mapping[str, Any] | None = None,
        *,
        timeout_s: float = 5.0,
        workers: int = 2,
        where: str = "params",
    ) -> None:
        self.where = where
        self.params = parse_params(self.Params, params, where)
        if not timeout_s > 0:
            raise ValueError(f"rewards.timeout_s must be > 0, got {timeout_s}")
        if workers < 1:
            raise ValueError(f"rewards.workers must be >= 1, got {workers}")
        self.timeout_s = float(timeout_s)
        self.workers = int(workers)
        self._counts: Counter[str] = Counter()
        self._runner: Any = None  # standalone calls only; see __call__

    def param_error(self, key: str, message: str) -> ValueError:
        """A ValueError naming the full key of one parameter (for range checks)."""
        return ValueError(f"{self.where}.{key}: {message}")

    # ------------------------------------------------------------------ in the workers

    @abstractmethod
    def score(self, sample: RewardInput) -> RewardResult:
        """Score one sample. Runs in a scoring worker process, under :meth:`budget_s`;
        raising ``TimeoutError`` counts as a timeout, anything else as an error."""

    def prepare_worker(self, worker_index: int) -> None:  # noqa: B027 - optional hook
        """Warm up in a fresh worker before its first sample (imports, grammars), so no
        sample's budget is spent on start-up. ``worker_index`` is unique per worker."""

    # ------------------------------------------------------------------ in the trainer

    def budget_s(self, sample: RewardInput) -> float:
        """Seconds ``sample`` may take before it scores 0 as a timeout."""
        return self.timeout_s

    def counters(self, sample: RewardInput, result: RewardResult) -> Iterable[str]:
        """Names of the counters one result adds to (beyond ``samples``, ``timeouts`` and
        ``errors``, which every reward keeps); default: the info flags that are true."""
        return [k for k, v in result.info.items() if v is True and k != "timeout"]

    def record(self, sample: RewardInput, result: RewardResult) -> None:
        """Count one result (called by the runner's owner, in the trainer process)."""
        self._counts["samples"] += 1
        if result.info.get("timeout") is True:
            self._counts["timeouts"] += 1
        if "error" in result.info:
            self._counts["errors"] += 1
        self._counts.update(self.counters(sample, result))

    def stats(self) -> dict[str, int]:
        """Cumulative counters (samples, timeouts, errors, ...) since construction."""
        return {"samples": 0, "timeouts": 0, "errors": 0, **self._counts}

    def __call__(self, samples: Sequence[RewardInput]) -> list[RewardResult]:
        """Score a batch in this reward's own worker processes (started on first use;
        :class:`~r1mega.rewards.RewardFunction` shares one set between its rewards)."""
        if self._runner is None:
            from r1mega.rewards.runner import RewardRunner

            self._runner = RewardRunner([self], self.workers)
        results = self._runner.run([(0, s) for s in samples])
        for sample, result in zip(samples, results, strict=True):
            self.record(sample, result)
        return results

    @property
    def runner(self) -> Any:
        """The :class:`~r1mega.rewards.runner.RewardRunner` of standalone calls, if any."""
        return self._runner

    def close(self) -> None:
        """Stop the worker processes of standalone calls; idempotent."""
        if self._runner is not None:
            self._runner.close()
            self._runner = None

    def __getstate__(self) -> dict[str, Any]:
        # Sent to the workers: configuration only, never the runner or the counters.
        state = dict(self.__dict__)
        state["_runner"] = None
        state["_counts"] = Counter()
        return state

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
