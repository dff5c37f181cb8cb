"""`r1mega eval CHECKPOINT`: accuracy of a checkpoint the way DeepSeek-R1 reports it.

* pass@1 averaged over k samples: for each problem, sample k responses (temperature 0.6,
  top-p 0.95 by default, the R1 paper's evaluation setting) and take the fraction that is
  correct; report the mean over problems. This is an unbiased pass@1 estimate with less
  variance than one sample.
* greedy accuracy: one temperature-0 response per problem.

Correctness is the ``accuracy`` reward (math-verify against the reference answer). The
model config travels with the checkpoint (``r1mega_config.yaml``); weights load at any
layout, so evaluation runs on one process by default, or ``--nproc N`` with layout
overrides.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from parallel.layout import Layout
from r1mega.bootstrap import start_job
from r1mega.data.prompts import PromptDataset, PromptExample
from r1mega.data.tasks import builtin_dataset, is_builtin
from r1mega.logging_utils import print_rank0
from r1mega.rollout.colocated import generation_layout_for
from r1mega.rollout.driver import Sampler, build_sampler, sample_groups, score
from r1mega.rollout.types import SamplingParams


@dataclass
class EvalResult:
    checkpoint: str
    data: str
    problems: int
    k: int
    pass_at_1: float  # mean over problems of the fraction of k samples that are correct
    greedy_accuracy: float
    mean_response_length: float


def eval_examples(cfg: Any, data: str | None, limit: int | None) -> list[PromptExample]:
    """The problems an evaluation scores: ``data`` (a file or ``builtin:<task>``, whose
    held-out split is used), default ``data.eval_path``; the first ``limit`` if given."""
    path = data or cfg.data.eval_path
    if not path:
        raise ValueError("no evaluation data: pass --data FILE or set data.eval_path")
    if is_builtin(path):
        examples = builtin_dataset(path, "eval", cfg.train.seed)
    else:
        examples = list(PromptDataset(path, prompt_field=cfg.data.prompt_field,
                                      answer_field=cfg.data.answer_field))
    return examples[:limit] if limit else examples


def accuracy_reward() -> Any:
    """The reward function that judges correctness in every evaluation: ``accuracy``
    alone (math-verify against the reference answer), weight 1."""
    from r1mega.rewards import RewardFunction

    return RewardFunction.from_config({"specs": [{"name": "accuracy", "weight": 1.0}]})


def sample_and_score(cfg: Any, sampler: Sampler, tokenizer: Any,
                     examples: list[PromptExample], group: int, params: SamplingParams,
                     layout: Layout, reward_fn: Any, batch_size: int,
                     responses: list[str] | None = None) -> tuple[list[float], list[int]]:
    """Correctness (0/1) and response length of ``group`` samples for every example,
    problem-major; with ``responses``, the decoded responses are appended to it in the
    same order. Collective: every rank calls it; ``reward_fn`` is needed on global rank 0
    only. ``r1mega eval`` and the in-training evaluation both score through it."""
    correct: list[float] = []
    lengths: list[int] = []
    # Whole batches of prompts whose rows split over DP; the tail is padded by repeating
    # the last problem and the padding rows are dropped from the result.
    per_batch = max(batch_size // group, 1)
    for start in range(0, len(examples), per_batch):
        chunk = examples[start:start + per_batch]
        real = len(chunk)
        while (len(chunk) * group) % layout.dp:
            chunk = chunk + chunk[-1:]
        samples, rows = sample_groups(sampler, tokenizer, chunk, group, params,
                                      cfg.data.template, list(cfg.rollout.stop),
                                      cfg.train.seed, start)
        _, per_reward, _ = score(reward_fn, tokenizer, samples, rows)
        keep = real * group
        correct.extend(per_reward.get("accuracy", [0.0] * len(samples))[:keep])
        lengths.extend(len(s.response_ids) for s in samples[:keep])
        if responses is not None:
            responses.extend(tokenizer.decode(s.response_ids) for s in samples[:keep])
    return correct, lengths


def run_eval(cfg: Any, checkpoint: str, data: str | None, k: int, temperature: float,
             top_p: float, max_new_tokens: int | None, limit: int | None,
             batch_size: int, output: str | None) -> EvalResult:
    job, policy = start_job(cfg, checkpoint)
    env, layout, tokenizer = job.env, job.layout, job.tokenizer
    sampler = build_sampler(generation_layout_for(cfg, env.world_size), policy, None,
                            tokenizer)
    examples = eval_examples(cfg, data, limit)
    reward_fn = accuracy_reward() if dist.get_rank() == 0 else None
    new_tokens = max_new_tokens or cfg.rollout.max_new_tokens
    common = dict(max_new_tokens=new_tokens, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    try:
        sampled, lengths = sample_and_score(
            cfg, sampler, tokenizer, examples, k,
            SamplingParams(temperature=temperature, top_p=top_p, **common), layout, reward_fn,
            batch_size)
        greedy, _ = sample_and_score(cfg, sampler, tokenizer, examples, 1,
                                     SamplingParams(temperature=0.0, **common), layout,
                                     reward_fn, batch_size)
    finally:
        if reward_fn is not None:
            reward_fn.close()
    per_problem = [sum(sampled[i * k:(i + 1) * k]) / k for i in range(len(examples))]
    result = EvalResult(
        checkpoint=str(checkpoint), data=str(data or cfg.data.eval_path),
        problems=len(examples), k=k, pass_at_1=sum(per_problem) / len(per_problem),
        greedy_accuracy=sum(greedy) / len(greedy),
        mean_response_length=sum(lengths) / len(lengths))
    print_rank0(f"[r1mega eval] {result.problems} problems | pass@1 (k={k}, T={temperature}, "
                f"top-p={top_p}) {result.pass_at_1:.4f} | greedy accuracy "
                f"{result.greedy_accuracy:.4f} | mean length {result.mean_response_length:.1f}")
    if output and env.rank == 0:
        Path(output).write_text(json.dumps(asdict(result), indent=2))
    dist.barrier()
    return result
