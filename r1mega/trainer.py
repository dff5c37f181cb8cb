"""The R1-Zero training loop on every rank: rollouts, rewards, GRPO updates, checkpoints.

Per step: take ``rollout.prompts_per_step`` prompts, apply the template, reshard the
policy's weights into the generation layout and sample ``grpo.group_size`` responses per
prompt with the colocated rollout engine (:mod:`r1mega.rollout.colocated`), score them
with the rule rewards, and run one GRPO update
(:func:`r1mega.training.grpo_step.grpo_step`) in the training layout.

A run resumes from the newest complete checkpoint under ``checkpoint.save_dir``
(model, optimizer, LR schedule, RNG and data position), so a job killed at any point
continues with the same results.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from parallel.layout import Layout
from r1mega.bootstrap import Job
from r1mega.checkpointing.train_state import load_latest_checkpoint, save_checkpoint
from r1mega.data.prompts import PromptExample, PromptSampler, load_prompt_dataset
from r1mega.data.sources import MixedPromptSampler, Source, load_source_examples
from r1mega.data.tasks import builtin_dataset, is_builtin
from r1mega.logging_utils import print_rank0
from r1mega.monitoring.memory import phase_peak_gib, start_phase
from r1mega.monitoring.wandb_logger import WandbMonitor
from r1mega.preemption import PreemptionHandler, finish_step
from r1mega.rollout.batch import build_rollout_batch
from r1mega.rollout.driver import Sampler, build_sampler, sample_groups, score
from r1mega.rollout.parity import check_logprob_parity
from r1mega.rollout.types import SamplingParams
from r1mega.training.grpo_step import grpo_step
from r1mega.training.length_schedule import response_budget
from r1mega.training.optim import build_lr_scheduler, build_optimizer, updates_per_step
from r1mega.training.reference import ReferencePolicy

if TYPE_CHECKING:  # imported when an evaluation is configured
    from r1mega.held_out_eval import HeldOutEvaluation


@dataclass
class StepRecord:
    step: int
    metrics: dict[str, float] = field(default_factory=dict)


def _dataset(cfg: Any, split: str) -> list[PromptExample]:
    path = getattr(cfg.data, f"{split}_path")
    if is_builtin(path):
        return builtin_dataset(path, split, cfg.train.seed)
    return list(load_prompt_dataset(cfg.data, split))


def _prompt_sampler(cfg: Any) -> PromptSampler | MixedPromptSampler:
    """Each step's training prompts: one dataset, or a weighted mix of sources."""
    if not cfg.data.sources:
        return PromptSampler(_dataset(cfg, "train"), batch_size=cfg.rollout.prompts_per_step,
                             seed=cfg.train.seed, shuffle=cfg.data.shuffle)
    sources = [Source(name=s.name, weight=s.weight, reward=s.reward,
                      examples=load_source_examples(
                          str(s.path), s.reward, s.prompt_field or cfg.data.prompt_field,
                          s.answer_field or cfg.data.answer_field, cfg.train.seed))
               for s in cfg.data.sources]
    return MixedPromptSampler(sources, cfg.rollout.prompts_per_step, seed=cfg.train.seed,
                              shuffle=cfg.data.shuffle)


def _build_reward_model(cfg: Any, tokenizer: Any) -> Any:
    """The reward model, when a data source is scored by one (collective)."""
    if not any(s.reward == "reward_model" for s in cfg.data.sources):
        return None
    from r1mega.rewards.reward_model import RewardModelScorer

    return RewardModelScorer.for_job(cfg, tokenizer)


def _build_reward_fn(cfg: Any) -> Any:
    if dist.get_rank() != 0:
        return None
    from r1mega.rewards import RewardFunction

    return RewardFunction.from_config(cfg.rewards)


def run_training(cfg: Any) -> list[StepRecord]:
    """Entry point of every rank for `r1mega train`."""
    preemption = PreemptionHandler().install()
    job = Job(cfg)
    layout = job.layout
    print_rank0(job.describe())
    tokenizer = job.tokenizer
    policy = job.build_policy(training=True)
    job.load_weights(policy, cfg.checkpoint.load)
    reference = _initial_reference(cfg, policy)
    optimizer = build_optimizer(policy, cfg.train, cfg.precision)
    scheduler = build_lr_scheduler(optimizer, cfg.train,
                                   cfg.train.steps * updates_per_step(cfg.grpo))
    sampler = _prompt_sampler(cfg)
    start_step = 1
    resumed = load_latest_checkpoint(cfg.checkpoint.save_dir, policy, optimizer, scheduler,
                                     reference)
    if resumed is not None:
        latest, state = resumed
        sampler.load_state_dict(state["sampler"])
        start_step = int(state["step"]) + 1
        print_rank0(f"[r1mega] resumed from {latest} (step {state['step']})")
    rollout = build_sampler(cfg, policy, optimizer, tokenizer)
    print_rank0(f"[r1mega] rollout engine: {rollout.describe()}")
    reward_fn = _build_reward_fn(cfg)
    reward_model = _build_reward_model(cfg, tokenizer)
    monitor = WandbMonitor(cfg)
    held_out = _held_out_evaluation(cfg, layout, tokenizer)
    history: list[StepRecord] = []

    def checkpoint(step: int) -> None:
        save_checkpoint(cfg.checkpoint.save_dir, step, policy, optimizer, scheduler,
                        {"step": step, "sampler": sampler.state_dict()},
                        keep_last=cfg.checkpoint.keep_last, config=cfg, reference=reference)

    try:
        if held_out is not None and start_step == 1:  # a resumed run evaluated step 0
            _evaluate_held_out(cfg, 0, held_out, rollout, monitor)
        for step in range(start_step, cfg.train.steps + 1):
            history.append(_train_one_step(cfg, step, layout, policy, reference, optimizer,
                                           scheduler, sampler, rollout, tokenizer, reward_fn,
                                           reward_model, monitor))
            _maybe_reset_reference(cfg, step, policy, reference)
            if held_out is not None and held_out.due(step):  # before the step's checkpoint
                _evaluate_held_out(cfg, step, held_out, rollout, monitor)
            finish_step(step, cfg.train.steps, cfg.checkpoint, checkpoint, preemption,
                        monitor, before_preemption_check=_maybe_inject_fault)
    finally:
        if reward_fn is not None:
            reward_fn.close()
        if held_out is not None:
            held_out.close()
        monitor.finish()
    dist.barrier()
    return history


# ---------------------------------------------------------------- the reference policy
def _initial_reference(cfg: Any, policy: Any) -> ReferencePolicy | None:
    """The KL reference: the policy's starting weights (a resumed run then restores the
    checkpoint's), or None when no KL term needs one."""
    return ReferencePolicy(policy) if cfg.grpo.kl_coef > 0 else None


def _maybe_reset_reference(cfg: Any, step: int, policy: Any,
                           reference: ReferencePolicy | None) -> None:
    """DeepSeek-R1's reference reset: after every ``grpo.reference_reset_interval`` steps
    the current policy becomes the reference (before that step's checkpoint, which then
    holds the new reference)."""
    interval = cfg.grpo.reference_reset_interval
    if reference is not None and interval > 0 and step % interval == 0:
        reference.refresh(policy)
        print_rank0(f"[r1mega] step {step}: the reference policy is now the current policy "
                    f"(grpo.reference_reset_interval={interval})")
# ----------------------------------------------------------------------------------------


# ------------------------------------------------------- held-out evaluation (eval.*)


def _held_out_evaluation(cfg: Any, layout: Layout, tokenizer: Any
                         ) -> HeldOutEvaluation | None:
    """The in-training held-out evaluation when ``eval.interval`` asks for one."""
    if not cfg.eval.interval:
        return None
    from r1mega.held_out_eval import HeldOutEvaluation

    return HeldOutEvaluation(cfg, layout, tokenizer)


def _evaluate_held_out(cfg: Any, step: int, held_out: HeldOutEvaluation, rollout: Sampler,
                       monitor: WandbMonitor) -> None:
    """Evaluate the policy after ``step`` (0: the initial policy); log and print it.
    Runs after the step's own logging, so it never mixes into the step's rollout
    metrics, and before its checkpoint, so a resumed run has every point it needs."""
    from r1mega.held_out_eval import eval_line

    result = held_out.run(rollout)
    monitor.log_eval(step, result.metrics, result.samples)
    print_rank0(eval_line(step, cfg.train.steps, result, cfg))


# ------------------------------------------------------- end of held-out evaluation


def _maybe_inject_fault(step: int) -> None:
    """Fault injection for resilience tests: R1MEGA_KILL_AFTER_STEP=k SIGKILLs every rank
    after step k (and its checkpoint, if one is due), like a node failure would."""
    kill_after = os.environ.get("R1MEGA_KILL_AFTER_STEP")
    if kill_after is not None and step == int(kill_after):
        dist.barrier()
        os.kill(os.getpid(), signal.SIGKILL)


def _train_one_step(cfg: Any, step: int, layout: Layout, policy: Any, reference: Any,
                    optimizer: Any, scheduler: Any, sampler: Any, rollout: Sampler,
                    tokenizer: Any, reward_fn: Any, reward_model: Any,
                    monitor: WandbMonitor) -> StepRecord:
    t0 = time.perf_counter()
    start_phase()
    examples = sampler.next_batch()
    # The step's response budget (rollout.length_schedule): the sampler gets it in the
    # sampling params; the batch and Dr. GRPO's divisor follow it.
    budget = response_budget(cfg, step)
    if step > 1 and budget != response_budget(cfg, step - 1):
        print_rank0(f"[r1mega] step {step}: response budget {budget.max_new_tokens} tokens, "
                    f"sequence length {budget.seq_length} (rollout.length_schedule)")
    params = SamplingParams(max_new_tokens=budget.max_new_tokens,
                            temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                            top_k=cfg.rollout.top_k, eos_id=tokenizer.eos_id,
                            pad_id=tokenizer.pad_id)
    samples, rows = sample_groups(rollout, tokenizer, examples, cfg.grpo.group_size, params,
                                  cfg.data.template, list(cfg.rollout.stop), cfg.train.seed,
                                  step)
    rollout_gib = phase_peak_gib()
    t1 = time.perf_counter()
    rewards, per_reward, per_source = score(reward_fn, tokenizer, samples, rows, reward_model)
    reward_stats = {f"reward/{k}": sum(v) / len(v) for k, v in per_reward.items() if v}
    reward_stats.update({f"reward/{name}/mean": v for name, v in per_source.items()})
    t2 = time.perf_counter()
    start_phase()
    batch, truncated = build_rollout_batch(samples, rewards.tolist(), budget.seq_length,
                                           tokenizer.pad_id)
    metrics = grpo_step(policy, reference, optimizer, scheduler, batch, cfg.grpo, cfg.train,
                        dp_size=layout.dp, temperature=cfg.rollout.temperature or 1.0,
                        max_response_len=budget.max_new_tokens,
                        pack=cfg.train.pack_sequences,
                        logprob_outlier_threshold=cfg.rollout.logprob_outlier_threshold).metrics
    check_logprob_parity(metrics, cfg.rollout.logprob_check)  # rollout vs trainer
    metrics["rollout/max_new_tokens"] = float(budget.max_new_tokens)
    t3 = time.perf_counter()
    lengths = [len(s.response_ids) for s in samples]
    new_tokens = sum(lengths)
    metrics.update(reward_stats)
    if reward_fn is not None:  # rank 0: cumulative timeouts, errors, unparsable answers ...
        metrics.update({f"reward/counts/{k}": float(v) for k, v in reward_fn.stats().items()})
    metrics.update(rollout.metrics)
    metrics.update(rollout.held_metrics("train"))
    metrics.update({
        "response_length": sum(lengths) / len(lengths),
        "response_length_max": float(max(lengths)), "truncated": float(truncated),
        "finished_frac": sum(s.finished for s in samples) / len(samples),
        "time/rollout": t1 - t0, "time/reward": t2 - t1, "time/train": t3 - t2,
        "time/step": t3 - t0,
        "tokens_per_s": (new_tokens + int(batch.response_mask.sum())) / (t3 - t0),
        "memory/rollout_gib": rollout_gib, "memory/train_gib": phase_peak_gib(),
    })
    monitor.log_step(step, metrics, response_lengths=lengths, samples=[
        {"prompt": ex.prompt, "answer": ex.answer or "",
         "response": tokenizer.decode(s.response_ids), "reward": float(r)}
        for s, ex, r in zip(samples, rows, rewards.tolist(), strict=True)])
    print_rank0(progress_line(cfg, step, metrics))
    return StepRecord(step=step, metrics=metrics)


def progress_line(cfg: Any, step: int, metrics: dict[str, float]) -> str:
    """The one-line summary of a step printed on rank 0."""
    phases = (f"rollout {metrics['time/rollout']:.1f}s")
    if "time/reshard" in metrics:
        phases = (f"reshard {metrics['time/reshard']:.2f}s "
                  f"generate {metrics['time/generate']:.1f}s")
    sources = "".join(f"{key.split('/')[1]} {value:.3f} | " for key, value in metrics.items()
                      if key.startswith("reward/") and key.endswith("/mean"))
    return (
        f"step {step}/{cfg.train.steps} | reward {metrics['reward_mean']:.3f} | {sources}"
        f"acc {metrics.get('reward/accuracy', float('nan')):.3f} | "
        f"format {metrics.get('reward/format', float('nan')):.3f} | "
        f"len {metrics['response_length']:.1f} | kl {metrics['kl_ref']:.4f} | "
        f"entropy {metrics['entropy']:.3f} | clip {metrics['clip_frac']:.3f} | "
        f"grad_norm {metrics['grad_norm']:.3f} | lr {metrics['lr']:.2e} | "
        f"tok/s {metrics['tokens_per_s']:,.0f} | "
        f"{phases} reward {metrics['time/reward']:.1f}s train {metrics['time/train']:.1f}s"
    )
