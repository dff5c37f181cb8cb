"""The trainer's reward: the weighted sum of the configured reward plug-ins.

``RewardFunction.from_config(cfg.rewards)`` builds one plug-in per ``rewards.specs[i]``;
calling it scores a batch with each and returns ``total[j] = sum_i weight_i * score_ij``
plus each plug-in's scores by name, which the trainer logs separately (a flat total hides
whether the policy is learning the format or the maths).

Every reward scores every sample in one shared set of ``rewards.workers`` scoring worker
processes (:class:`~r1mega.rewards.runner.RewardRunner`), each sample under its reward's
time budget: a sample that hangs or crashes a reward scores 0 for that reward and is
counted (``<name>/timeouts``, ``<name>/errors``), and never stalls the step.

Names must be unique: the per-reward scores and counters are keyed by name, and two specs
of the same reward would collide there. (To weight one reward more, change its weight.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

from omegaconf import DictConfig, ListConfig, OmegaConf

from r1mega.config.validate import ConfigError
from r1mega.rewards.base import Reward, RewardInput, RewardResult
from r1mega.rewards.registry import get_reward
from r1mega.rewards.runner import RewardRunner

__all__ = ["RewardBreakdown", "RewardFunction"]


@dataclass
class RewardBreakdown:
    """Everything one evaluation produced, for logging sample tables."""

    total: list[float]
    scores: dict[str, list[float]] = field(default_factory=dict)
    infos: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def _get(obj: Any, key: str, default: Any = None) -> Any:
    """Read a field from an omegaconf node, a dataclass or a plain dict alike."""
    if isinstance(obj, Mapping | DictConfig):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _plain(value: Any) -> Any:
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


class RewardFunction:
    """Weighted sum of reward plug-ins; owns them (``close()`` closes them all)."""

    def __init__(self, rewards: Sequence[tuple[str, float, Reward]], workers: int = 2) -> None:
        if not rewards:
            raise ValueError("a RewardFunction needs at least one reward")
        names = [name for name, _, _ in rewards]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate reward names: {', '.join(duplicates)}")
        self.rewards: list[tuple[str, float, Reward]] = list(rewards)
        self.workers = workers
        self._runner: RewardRunner | None = None  # started on the first batch

    @classmethod
    def from_config(cls, cfg: Any, *, key: str = "rewards") -> RewardFunction:
        """Build from a ``RewardsConfig`` (omegaconf node or dataclass).

        Every mistake is a :class:`~r1mega.config.ConfigError` (a ValueError) naming the
        key, e.g. ``rewards.specs[1].name`` or ``rewards.specs[0].params.taget``.
        """
        specs = list(_get(cfg, "specs", None) or [])
        timeout_s = float(_get(cfg, "timeout_s", 5.0))
        workers = int(_get(cfg, "workers", 2))
        if not specs:
            raise ConfigError(f"{key}.specs is empty: configure at least one reward")
        seen: dict[str, int] = {}
        built: list[tuple[str, float, Reward]] = []
        try:
            for i, spec in enumerate(specs):
                where = f"{key}.specs[{i}]"
                name = _get(spec, "name")
                if name in seen:
                    raise ConfigError(
                        f"{where}.name: reward {name!r} is already {key}.specs[{seen[name]}]; "
                        "each reward may appear once (change its weight instead)"
                    )
                try:
                    reward_cls = get_reward(name)
                except ValueError as e:
                    raise ConfigError(f"{where}.name: {e}") from None
                params = _plain(_get(spec, "params", None)) or {}
                if not isinstance(params, dict):
                    raise ConfigError(f"{where}.params must be a mapping, got {params!r}")
                try:
                    reward = reward_cls(
                        params, timeout_s=timeout_s, workers=workers, where=f"{where}.params"
                    )
                except ValueError as e:
                    raise ConfigError(str(e)) from e
                seen[name] = i
                built.append((name, float(_get(spec, "weight", 1.0)), reward))
        except BaseException:
            for _, _, reward in built:
                reward.close()
            raise
        return cls(built, workers)

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.rewards]

    @property
    def weights(self) -> dict[str, float]:
        return {name: weight for name, weight, _ in self.rewards}

    def evaluate(self, samples: Sequence[RewardInput]) -> RewardBreakdown:
        """Score ``samples`` with every reward; keeps the per-sample infos."""
        if self._runner is None:
            self._runner = RewardRunner([reward for _, _, reward in self.rewards],
                                        self.workers)
        jobs = [(k, s) for k in range(len(self.rewards)) for s in samples]
        results = self._runner.run(jobs) if samples else []
        total = [0.0] * len(samples)
        out = RewardBreakdown(total)
        for k, (name, weight, reward) in enumerate(self.rewards):
            mine: list[RewardResult] = results[k * len(samples):(k + 1) * len(samples)]
            for sample, result in zip(samples, mine, strict=True):
                reward.record(sample, result)
            scores = [float(r.score) for r in mine]
            for j, score in enumerate(scores):
                total[j] += weight * score
            out.scores[name] = scores
            out.infos[name] = [r.info for r in mine]
        return out

    def __call__(
        self, samples: Sequence[RewardInput]
    ) -> tuple[list[float], dict[str, list[float]]]:
        """``(total, {name: scores})`` with ``total[j] = sum of weight * score``."""
        out = self.evaluate(samples)
        return out.total, out.scores

    def stats(self) -> dict[str, int]:
        """Every reward's cumulative counters as ``{"<name>/<counter>": value}``, plus the
        scoring workers' (``workers/restarts``: killed after a timeout, ``workers/deaths``)."""
        out = {
            f"{name}/{k}": v for name, _, reward in self.rewards for k, v in reward.stats().items()
        }
        runner = self._runner
        out["workers/restarts"] = runner.restarts if runner else 0
        out["workers/deaths"] = runner.worker_deaths if runner else 0
        return out

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
        for _, _, reward in self.rewards:
            reward.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
