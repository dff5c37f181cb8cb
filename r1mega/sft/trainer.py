"""The SFT job on every rank: `r1mega sft` (cold start, the large SFT stage) and
`r1mega distill` (the same training for a student model on a teacher's sampled data).

It runs like the RL job (:mod:`r1mega.trainer`): the policy in ``train_layout`` (any
TP/PP/EP/DP), megatron-core's distributed optimizer and LR schedule from ``train.*``,
initial weights from ``checkpoint.load`` (a checkpoint of any layout, e.g. a converted
base model or the teacher's), checkpoints under ``checkpoint.save_dir`` with resumption
from the newest complete one -- mid-epoch, at the exact next row --, SIGTERM/SIGUSR1
preemption, one progress line per step on rank 0 and a W&B run.

Length: ``sft.epochs`` passes over the rows, ``ceil(epochs * rows / global_batch_size)``
optimizer steps; the LR schedule always spans all of them. ``train.steps`` stops a run
earlier (a run started again with a larger ``train.steps`` resumes where it stopped, on
the same schedule).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from parallel.layout import Layout
from r1mega.bootstrap import Job
from r1mega.checkpointing.train_state import load_latest_checkpoint, save_checkpoint
from r1mega.data.prompts import PromptSampler
from r1mega.logging_utils import print_rank0
from r1mega.monitoring.wandb_logger import WandbMonitor
from r1mega.preemption import PreemptionHandler, finish_step
from r1mega.sft.batching import step_batch
from r1mega.sft.data import SFTDataReport, SFTExample, load_sft_examples
from r1mega.sft.provenance import read_provenance
from r1mega.sft.step import sft_step
from r1mega.training.optim import build_lr_scheduler, build_optimizer
from r1mega.training.policy import Policy

STAGES = ("sft", "distill")


@dataclass
class SFTStepRecord:
    step: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SFTPlan:
    """How long the job is: ``epochs`` passes over ``rows`` in batches of ``batch_size``."""

    rows: int
    epochs: int
    batch_size: int

    @property
    def total_steps(self) -> int:
        return -(-self.rows * self.epochs // self.batch_size)

    def describe(self) -> str:
        return (f"{self.rows} rows x {self.epochs} epoch(s) in global batches of "
                f"{self.batch_size} = {self.total_steps} steps")


def run_sft(cfg: Any) -> list[SFTStepRecord]:
    """Entry point of every rank for `r1mega sft`."""
    return train_sft(cfg, stage="sft")


def run_distill(cfg: Any) -> list[SFTStepRecord]:
    """Entry point of every rank for `r1mega distill`: SFT of ``cfg.model`` (the student)
    on ``sft.train_path`` (the teacher's rejection-sampled data), whose provenance is
    checked and printed first."""
    return train_sft(cfg, stage="distill")


def _banner(cfg: Any, stage: str, layout: Layout) -> str:
    model = cfg.model
    shape = f"{model.arch} ({model.num_layers} layers, hidden {model.hidden_size})"
    if stage == "distill":
        return (f"[r1mega] distillation: SFT of the student {shape} in layout "
                f"TP={layout.tp} PP={layout.pp} EP={layout.ep} on the teacher's data "
                f"{cfg.sft.train_path}")
    return f"[r1mega] supervised fine-tuning of {shape} on {cfg.sft.train_path}"


def _report_provenance(data_path: str, template: str) -> None:
    """Print (rank 0) what the rejection-sampling stage recorded about the data."""
    provenance = read_provenance(data_path, template)
    if provenance is None:
        print_rank0(f"[r1mega] no stats.json or run.json beside {data_path}: provenance "
                    f"unknown (not written by `r1mega sample`?)")
        return
    for line in provenance.lines():
        print_rank0(f"[r1mega] {line}")


def _load_data(cfg: Any, stage: str, job: Job) -> tuple[Any, list[SFTExample], SFTDataReport]:
    if not cfg.sft.train_path:
        raise ValueError(f"r1mega {stage} needs sft.train_path (a JSONL/Parquet file of "
                         f"{cfg.sft.prompt_field}/{cfg.sft.response_field} rows)")
    if stage == "distill":
        _report_provenance(cfg.sft.train_path, cfg.data.template)
    tokenizer = job.tokenizer
    examples, report = load_sft_examples(cfg, tokenizer)
    for line in report.lines():
        print_rank0(f"[r1mega] {line}")
    return tokenizer, examples, report


def _start(job: Job, policy: Policy, optimizer: Any, scheduler: Any,
           sampler: PromptSampler) -> int:
    """The first step to run: after the newest complete checkpoint (restoring model,
    optimizer, schedule, RNG and row position), else 1 with ``checkpoint.load``'s
    weights (if any; any kind of weights path, as for RL)."""
    cfg = job.cfg
    resumed = load_latest_checkpoint(cfg.checkpoint.save_dir, policy, optimizer, scheduler)
    if resumed is None:
        job.load_weights(policy, cfg.checkpoint.load)
        return 1
    latest, state = resumed
    if "sampler" not in state:
        raise ValueError(f"{latest} is not an SFT checkpoint (no data position); use "
                         f"another checkpoint.save_dir, or checkpoint.load for its weights")
    sampler.load_state_dict(state["sampler"])
    print_rank0(f"[r1mega] resumed from {latest} (step {state['step']}; epoch "
                f"{sampler.epoch}, next row {sampler.position} of {len(sampler.dataset)})")
    return int(state["step"]) + 1


def train_sft(cfg: Any, stage: str = "sft") -> list[SFTStepRecord]:
    """Run the SFT job ``stage`` (``sft`` | ``distill``) on this rank; returns the step
    records (the same on every rank)."""
    from omegaconf import OmegaConf

    if stage not in STAGES:
        raise ValueError(f"unknown SFT stage {stage!r}: expected one of {STAGES}")
    preemption = PreemptionHandler().install()
    if cfg.train_layout.cp > 1 and cfg.sft.pack_sequences:
        from r1mega.config import ConfigError

        raise ConfigError(f"sft.pack_sequences=true with train_layout.cp="
                          f"{cfg.train_layout.cp}: packed rows are not split over "
                          "context-parallel ranks; set sft.pack_sequences=false (padded rows "
                          "are) or train_layout.cp=1")
    job = Job(cfg)
    layout = job.layout
    print_rank0(job.describe())
    print_rank0(_banner(cfg, stage, layout))
    tokenizer, examples, report = _load_data(cfg, stage, job)
    plan = SFTPlan(len(examples), cfg.sft.epochs, cfg.train.global_batch_size)
    policy = job.build_policy(training=True)
    optimizer = build_optimizer(policy, cfg.train, cfg.precision)
    scheduler = build_lr_scheduler(optimizer,
                                   OmegaConf.merge(cfg.train, {"steps": plan.total_steps}))
    sampler = PromptSampler(examples, batch_size=cfg.train.global_batch_size,
                            seed=cfg.train.seed, shuffle=cfg.data.shuffle)
    start_step = _start(job, policy, optimizer, scheduler, sampler)
    last_step = min(cfg.train.steps, plan.total_steps)
    layout_kind = (f"packed into sequences of <= {cfg.train.seq_length} tokens"
                   if cfg.sft.pack_sequences else
                   f"padded, micro_batch_size {cfg.train.micro_batch_size}")
    print_rank0(f"[r1mega] {plan.describe()} ({layout_kind}); running steps {start_step}"
                f"..{last_step}")
    monitor = WandbMonitor(cfg)
    history: list[SFTStepRecord] = []

    def checkpoint(step: int) -> None:
        save_checkpoint(cfg.checkpoint.save_dir, step, policy, optimizer, scheduler,
                        {"step": step, "sampler": sampler.state_dict(), "stage": stage},
                        keep_last=cfg.checkpoint.keep_last, config=cfg)

    try:
        for step in range(start_step, last_step + 1):
            metrics = _train_step(cfg, layout, policy, optimizer, scheduler, sampler,
                                  examples, tokenizer.pad_id)
            if step == start_step:
                metrics.update(report.metrics())
            monitor.log_step(step, metrics)
            print_rank0(progress_line(step, last_step, plan, metrics))
            history.append(SFTStepRecord(step, metrics))
            finish_step(step, last_step, cfg.checkpoint, checkpoint, preemption, monitor)
    finally:
        monitor.finish()
    dist.barrier()
    return history


def _train_step(cfg: Any, layout: Layout, policy: Policy, optimizer: Any, scheduler: Any,
                sampler: PromptSampler, examples: list[SFTExample], pad_id: int
                ) -> dict[str, float]:
    """Draw the next global batch, lay it out for this rank, run one update; returns
    the step's metrics (the same on every rank)."""
    from megatron.core import parallel_state as ps

    t0 = time.perf_counter()
    batch = step_batch([examples[i] for i in sampler.next_global_indices()],
                       pack=cfg.sft.pack_sequences, dp_rank=ps.get_data_parallel_rank(),
                       dp_size=layout.dp, micro_batch_size=cfg.train.micro_batch_size,
                       seq_length=cfg.train.seq_length, pad_id=pad_id,
                       pad_multiple=_pad_multiple(layout, policy.config.sequence_parallel))
    metrics = sft_step(policy, optimizer, scheduler, batch.microbatches)
    seconds = time.perf_counter() - t0
    metrics.update({
        "epoch": sampler.epoch + sampler.position / len(examples),
        "rows": float(batch.rows), "tokens_per_s": batch.real_tokens / seconds,
        "time/step": seconds, "perf/padding_frac": batch.padding_frac,
        "perf/tokens": float(batch.real_tokens),
    })
    return metrics


def _pad_multiple(layout: Layout, sequence_parallel: bool) -> int:
    """Row widths divide into what the layout splits a sequence into: TP ranks under
    sequence parallelism, and 2 * CP load-balanced chunks (each CP rank's share again
    over TP)."""
    tp = layout.tp if sequence_parallel else 1
    return tp * 2 * layout.cp if layout.cp > 1 else tp


def progress_line(step: int, last_step: int, plan: SFTPlan, metrics: dict[str, float]) -> str:
    """The one-line summary of an SFT step printed on rank 0."""
    return (f"step {step}/{last_step} | epoch {metrics['epoch']:.2f}/{plan.epochs} | "
            f"loss {metrics['loss']:.4f} | resp_tokens {metrics['response_tokens']:.0f} | "
            f"grad_norm {metrics['grad_norm']:.3f} | lr {metrics['lr']:.2e} | "
            f"tok/s {metrics['tokens_per_s']:,.0f} | pad {metrics['perf/padding_frac']:.2f} | "
            f"{metrics['time/step']:.2f}s")
