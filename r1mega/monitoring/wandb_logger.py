"""Weights & Biases logging from global rank 0.

``logging.wandb_mode``: ``online``, ``offline`` (no network: runs land under
``<wandb_dir>/wandb/offline-run-*``, syncable later with ``wandb sync``) or ``disabled``.
Other ranks never touch wandb. Every step logs the namespaced metrics
(:mod:`r1mega.monitoring.metrics`), a response-length histogram, and every
``logging.sample_table_interval`` steps a table of prompts, responses and rewards.
"""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist

from r1mega.monitoring.metrics import namespaced


class WandbMonitor:
    """Owns the W&B run of a job (a no-op on ranks other than 0 or when disabled).

    Its files go to ``logging.wandb_dir``, else ``run_dir``, else beside the checkpoints
    (the parent of ``checkpoint.save_dir``), else the working directory."""

    def __init__(self, cfg: Any, run_dir: str | None = None) -> None:
        self.run = None
        self.sample_interval = int(cfg.logging.sample_table_interval)
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        if not rank0 or cfg.logging.wandb_mode == "disabled":
            return
        import wandb
        from omegaconf import OmegaConf

        beside_checkpoints = (os.path.dirname(os.path.abspath(cfg.checkpoint.save_dir))
                              if cfg.checkpoint.save_dir else None)
        directory = cfg.logging.wandb_dir or run_dir or beside_checkpoints or os.getcwd()
        os.makedirs(directory, exist_ok=True)
        self.run = wandb.init(
            project=cfg.logging.wandb_project,
            name=cfg.logging.wandb_run_name,
            mode=cfg.logging.wandb_mode,
            dir=directory,
            config=OmegaConf.to_container(cfg, resolve=True),
            settings=wandb.Settings(silent=True, console="off"),
        )
        for prefix in ("train", "rollout", "reward", "perf", "memory", "eval"):
            self.run.define_metric(f"{prefix}/*", step_metric="train/step")

    @property
    def directory(self) -> str | None:
        return None if self.run is None else self.run.dir

    def log_step(self, step: int, metrics: dict[str, float],
                 response_lengths: list[int] | None = None,
                 samples: list[dict[str, Any]] | None = None) -> None:
        if self.run is None:
            return
        import wandb

        payload: dict[str, Any] = {"train/step": step, **namespaced(metrics)}
        if response_lengths:
            payload["rollout/response_length_hist"] = wandb.Histogram(response_lengths)
        if samples and self.sample_interval and step % self.sample_interval == 0:
            columns = list(samples[0].keys())
            payload["rollout/samples"] = wandb.Table(
                columns=columns, data=[[s[c] for c in columns] for s in samples])
        self.run.log(payload, step=step)

    def log_eval(self, step: int, metrics: dict[str, float],
                 samples: list[dict[str, Any]]) -> None:
        """A held-out evaluation after ``step`` (0: before training): ``eval/*`` metrics
        and an ``eval/samples`` table, in the same history row as that step's metrics."""
        if self.run is None:
            return
        import wandb

        payload: dict[str, Any] = {"train/step": step, **metrics}
        if samples:
            columns = list(samples[0].keys())
            payload["eval/samples"] = wandb.Table(
                columns=columns, data=[[s[c] for c in columns] for s in samples])
        self.run.log(payload, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
