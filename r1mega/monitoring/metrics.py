"""Stable metric names shared by the console line and W&B.

The trainer produces flat metrics (``loss``, ``kl_ref``, ``reward/accuracy``, ...); this
module maps them to the namespaced names dashboards are built on, so renaming an internal
variable never breaks a saved W&B chart.
"""

from __future__ import annotations

# internal name -> logged name
METRIC_NAMES: dict[str, str] = {
    "loss": "train/loss",
    "kl_ref": "train/kl",
    "entropy": "train/entropy",
    "clip_frac": "train/clip_frac",
    "clip_frac_low": "train/clip_frac_low",
    "clip_frac_high": "train/clip_frac_high",
    "dual_clip_frac": "train/dual_clip_frac",
    "ratio_mean": "train/ratio_mean",
    "ppo_kl": "train/ppo_kl",
    "grad_norm": "train/grad_norm",
    "lr": "train/lr",
    "tis_weight_mean": "train/tis_weight_mean",
    "kl_penalty_mean": "train/kl_penalty_mean",
    "advantage_abs_mean": "train/advantage_abs_mean",
    "uniform_group_frac": "train/uniform_group_frac",
    "reward_mean": "reward/mean",
    "response_length": "rollout/response_length",
    "response_length_max": "rollout/response_length_max",
    "truncated": "rollout/truncated",
    "finished_frac": "rollout/finished_frac",
    "tokens_per_s": "perf/tokens_per_s",
    "time/rollout": "perf/time_rollout_s",
    "time/reward": "perf/time_reward_s",
    "time/train": "perf/time_train_s",
    "time/step": "perf/time_step_s",
    "time/reshard": "perf/time_reshard_s",
    "time/generate": "perf/time_generate_s",
}

#: Prefixes already namespaced by the producer (per-reward scores, memory per phase, the
#: rollout engine's counters, resharding traffic).
PASSTHROUGH_PREFIXES = ("reward/", "memory/", "eval/", "rollout/", "perf/")


def namespaced(metrics: dict[str, float]) -> dict[str, float]:
    """Map trainer metrics to logged names; unknown keys go under ``train/``."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key.startswith(PASSTHROUGH_PREFIXES):
            out[key] = value
        elif key in METRIC_NAMES:
            out[METRIC_NAMES[key]] = value
        else:
            out[f"train/{key.replace('/', '_')}"] = value
    return out
