"""Held-out evaluation during RL training (``eval.*``): the curves of the R1 paper.

Before the first step, every ``eval.interval`` steps and after the last step, the
policy samples ``eval.k`` responses per held-out problem (``eval.path``, default
``data.eval_path``; for a built-in task its held-out split) with the job's own rollout
engine at the R1 protocol (temperature 0.6, top-p 0.95 by default). Each response is
scored by the ``accuracy`` reward (math-verify against the reference answer), as
``r1mega eval`` does; pass@1 is the fraction correct averaged over the k samples and
the problems. Results go to W&B as ``eval/*`` with a table of sampled responses, and to
the console as an ``eval step ...`` line on rank 0.

Every evaluation draws the same per-request sampling seeds (a function of the run seed
and the row only), so successive points of the curve differ by the model, not by the
draw, and a resumed run evaluates exactly as an uninterrupted one would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from parallel.layout import Layout
from r1mega.evaluation import accuracy_reward, eval_examples, sample_and_score
from r1mega.rollout.driver import Sampler
from r1mega.rollout.types import SamplingParams


@dataclass
class HeldOutResult:
    """One evaluation: ``eval/*`` metrics and the responses kept for the sample table."""

    metrics: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list)


def eval_due(step: int, interval: int, last_step: int) -> bool:
    """Whether an evaluation follows step ``step`` (0: before the first step)."""
    if interval <= 0:
        return False
    return step == 0 or step % interval == 0 or step == last_step


def table_order(problems: int, k: int, limit: int) -> list[int]:
    """Which of the problem-major ``problems * k`` responses the sample table keeps:
    the first sample of every problem, then the second, ..., ``limit`` in all, so that a
    small table shows many problems."""
    order = [i * k + j for j in range(k) for i in range(problems)]
    return order[:limit]


class HeldOutEvaluation:
    """Held-out pass@1 and response length of the current policy (collective: every rank
    constructs it and calls :meth:`run`; rewards are computed on global rank 0)."""

    def __init__(self, cfg: Any, layout: Layout, tokenizer: Any) -> None:
        self.cfg = cfg
        self.layout = layout
        self.tokenizer = tokenizer
        self.examples = eval_examples(cfg, cfg.eval.path, cfg.eval.limit)
        self.reward_fn = accuracy_reward() if dist.get_rank() == 0 else None
        self.params = SamplingParams(
            max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
            temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
            eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)

    def due(self, step: int) -> bool:
        return eval_due(step, self.cfg.eval.interval, self.cfg.train.steps)

    def run(self, sampler: Sampler) -> HeldOutResult:
        """Sample, score and summarise; the sampler's own ``metrics`` are overwritten."""
        k = self.cfg.eval.k
        start = time.perf_counter()
        responses: list[str] = []
        correct, lengths = sample_and_score(
            self.cfg, sampler, self.tokenizer, self.examples, k, self.params, self.layout,
            self.reward_fn, batch_size=len(self.examples) * k, responses=responses)
        metrics = {"eval/pass_at_1": sum(correct) / len(correct),
                   "eval/response_length": sum(lengths) / len(lengths),
                   "eval/response_length_max": float(max(lengths)),
                   "eval/problems": float(len(self.examples)), "eval/k": float(k),
                   "eval/time_s": time.perf_counter() - start}
        samples = []
        for index in table_order(len(self.examples), k, self.cfg.eval.table_rows):
            example = self.examples[index // k]
            samples.append({"problem": index // k, "sample": index % k,
                            "prompt": example.prompt, "answer": example.answer or "",
                            "response": responses[index], "correct": float(correct[index]),
                            "length": lengths[index]})
        return HeldOutResult(metrics=metrics, samples=samples)

    def close(self) -> None:
        if self.reward_fn is not None:
            self.reward_fn.close()
            self.reward_fn = None


def eval_line(step: int, total: int, result: HeldOutResult, cfg: Any) -> str:
    """The console line of one evaluation, printed on rank 0 beside the step lines."""
    m = result.metrics
    return (f"eval step {step}/{total} | pass@1 {m['eval/pass_at_1']:.4f} | "
            f"len {m['eval/response_length']:.1f} | problems {int(m['eval/problems'])} | "
            f"k {cfg.eval.k} | T {cfg.eval.temperature:g} | top-p {cfg.eval.top_p:g} | "
            f"time {m['eval/time_s']:.1f}s")
