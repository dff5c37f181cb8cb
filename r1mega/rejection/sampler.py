"""`r1mega sample CONFIG`: rejection sampling on every rank of the job.

The same generation path as RL rollouts and ``r1mega generate``: the policy is built in
the training layout, loads ``checkpoint.load``, and each batch is resharded into the
generation layout and decoded by the rollout engine. Every rank generates; rank 0 scores
(rule rewards), filters and writes, like the trainer's rewards.

Each sample's seed is a function of (``train.seed``, prompt index, sample number) only
(:func:`r1mega.rollout.driver.request_seed`), so a prompt's samples do not depend on
which batch it lands in: a resumed run, or one with another ``sample.prompts_per_batch``,
writes the rows an uninterrupted run would. (Sample numbers must stay below 10,007 for
the seeds of different prompts not to overlap.)
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist
from omegaconf import OmegaConf

from r1mega.bootstrap import Job, weight_source
from r1mega.checkpointing.paths import WeightSource
from r1mega.config.validate import ConfigError
from r1mega.data.templates import apply_template
from r1mega.logging_utils import print_rank0
from r1mega.rejection.faults import maybe_kill
from r1mega.rejection.filtering import RULES, FilterSettings
from r1mega.rejection.judge import judge_batch
from r1mega.rejection.prompts import SamplingPrompt, load_prompts, prompt_sources
from r1mega.rejection.scoring import (
    BatchScorer,
    RewardModelScorer,
    check_reward_model,
    resolve_reward_model,
)
from r1mega.rejection.stats import SampleStats, progress_line
from r1mega.rejection.store import PromptOutcome, SampleStore, StoreError
from r1mega.rollout.types import SamplingParams


def manifest_weights(source: WeightSource | None) -> Path | None:
    """The weights a run samples from, as an absolute path for its manifest: the
    checkpoint (an RL run's ``save_dir`` means its newest complete step), or the model
    directory the job converts or pretrains first; ``None`` without weights."""
    if source is None:
        return None
    return (source.checkpoint or source.path).absolute()


def manifest(cfg: Any, prompts: Sequence[SamplingPrompt], weights: Path | None
             ) -> dict[str, Any]:
    """Everything that decides which rows the run writes (``prompts_per_batch`` does
    not: results do not depend on batching, so it may change between restarts)."""
    counts = {s: sum(p.source == s for p in prompts) for s in {p.source for p in prompts}}
    plain = OmegaConf.to_container
    sample, rollout = cfg.sample, cfg.rollout
    return {
        "prompts": [{"name": s.name, "path": s.path, "kind": s.kind, "count": counts.get(s.name, 0)}
                    for s in prompt_sources(cfg)],
        "weights": str(weights) if weights else None,
        "model": plain(cfg.model),
        "tokenizer": plain(cfg.tokenizer),
        "seed": cfg.train.seed,
        "template": cfg.data.template,
        "samples_per_prompt": sample.samples_per_prompt,
        "sampling": {"max_new_tokens": rollout.max_new_tokens,
                     "temperature": rollout.temperature, "top_p": rollout.top_p,
                     "top_k": rollout.top_k, "stop": list(rollout.stop)},
        "rewards": plain(cfg.rewards.specs),
        "reward_model": cfg.rewards.reward_model.load,
        "filters": {"min_reward": sample.min_reward,
                    "reward_model_threshold": sample.reward_model_threshold,
                    "dedupe": sample.dedupe, "max_kept_per_prompt": sample.max_kept_per_prompt,
                    "readability": plain(sample.readability)},
    }


def _open_store(cfg: Any, prompts: Sequence[SamplingPrompt], weights: Path | None,
                tally: SampleStats) -> tuple[SampleStore | None, set[int]]:
    """Rank 0 opens (and repairs) the output directory and counts the done prompts into
    ``tally``; every rank learns their indices, or rank 0's error."""
    store, done, error = None, {}, None
    if dist.get_rank() == 0:
        store = SampleStore(cfg.sample.output_dir)
        try:
            done = store.open(manifest(cfg, prompts, weights))
            for record in store.progress():
                tally.add(record)
        except (StoreError, OSError) as err:
            error = f"{type(err).__name__}: {err}"
    holder = [(sorted(done), error)]
    dist.broadcast_object_list(holder, src=0)
    indices, error = holder[0]
    if error:
        raise StoreError(f"sample.output_dir={cfg.sample.output_dir}: {error}")
    return store, set(indices)


def _batches(prompts: Sequence[SamplingPrompt], size: int) -> Iterator[list[SamplingPrompt]]:
    for start in range(0, len(prompts), size):
        yield list(prompts[start:start + size])


def _generate(cfg: Any, sampler: Any, tokenizer: Any, batch: Sequence[SamplingPrompt],
              params: SamplingParams) -> list[Any]:
    """``samples_per_prompt`` samples of every prompt of ``batch``, prompt-major."""
    from r1mega.rollout.driver import request_seed

    k = cfg.sample.samples_per_prompt
    ids = [tokenizer.encode(apply_template(cfg.data.template, p.example.prompt, tokenizer))
           for p in batch]
    rows = [ids[b] for b in range(len(batch)) for _ in range(k)]
    seeds = [request_seed(cfg.train.seed, p.index, j) for p in batch for j in range(k)]
    return sampler.generate(rows, params, seeds, list(cfg.rollout.stop), tokenizer.decode)


def _build_generation(job: Job, source: WeightSource | None) -> tuple[Any, Any]:
    """The tokenizer and the rollout sampler over the policy's weights (collective)."""
    from r1mega.rollout.colocated import generation_layout_for
    from r1mega.rollout.driver import build_sampler

    cfg = job.cfg
    tokenizer = job.tokenizer
    policy = job.build_policy()
    if job.load_weights(policy, source) is None:
        print_rank0("[r1mega sample] WARNING: checkpoint.load is not set; sampling from the "
                    f"randomly initialised policy (train.seed={cfg.train.seed}): a smoke "
                    "test, not data worth training on")
    sampler = build_sampler(generation_layout_for(cfg, job.env.world_size), policy, None,
                            tokenizer)
    return tokenizer, sampler


def run_sampling(cfg: Any, reward_model: RewardModelScorer | None = None
                 ) -> dict[str, Any] | None:
    """Entry point of every rank for `r1mega sample`; returns the final stats on rank 0.

    ``reward_model`` scores the prompts of ``reward: reward_model`` sources (see
    :class:`~r1mega.rejection.scoring.RewardModelScorer`)."""
    if not cfg.sample.output_dir:
        raise ConfigError("sample.output_dir is not set: r1mega sample needs a directory for "
                          "dataset.jsonl and stats.json (e.g. sample.output_dir=runs/sample)")
    job = Job(cfg)
    print_rank0(job.describe())
    rank0 = job.env.rank == 0
    prompts = load_prompts(cfg)
    check_reward_model(cfg, reward_model)
    source = weight_source(cfg.checkpoint.load) if cfg.checkpoint.load else None
    weights = manifest_weights(source)
    tally = SampleStats(len(prompts))
    store, done = _open_store(cfg, prompts, weights, tally)
    remaining = [p for p in prompts if p.index not in done]
    print_rank0(f"[r1mega sample] {len(prompts)} prompts x {cfg.sample.samples_per_prompt} "
                f"samples -> {cfg.sample.output_dir}; {len(done)} done, "
                f"{len(remaining)} to go")
    stats = tally.as_dict() if store is not None else None
    if not remaining:
        if store is not None:
            store.write_stats(stats)
        print_rank0("[r1mega sample] every prompt is done; nothing to sample")
        dist.barrier()
        return stats

    tokenizer, sampler = _build_generation(job, source)
    scorer_model = resolve_reward_model(cfg, reward_model, tokenizer)
    rules = None
    if rank0 and any(p.kind == RULES for p in remaining):
        from r1mega.rewards import RewardFunction

        rules = RewardFunction.from_config(cfg.rewards)
    scorer = BatchScorer(rules, scorer_model)
    settings = FilterSettings.from_config(cfg.sample)
    params = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens,
                            temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                            top_k=cfg.rollout.top_k, eos_id=tokenizer.eos_id,
                            pad_id=tokenizer.pad_id)
    k = cfg.sample.samples_per_prompt
    batches = list(_batches(remaining, cfg.sample.prompts_per_batch))
    try:
        for number, batch in enumerate(batches, start=1):
            start = time.perf_counter()
            samples = _generate(cfg, sampler, tokenizer, batch, params)
            texts = [tokenizer.decode(s.response_ids) for s in samples]
            rows_of = [p for p in batch for _ in range(k)]
            scores = scorer(rows_of, texts)  # every rank: a reward model may be collective
            records: list[PromptOutcome] = []
            if store is not None:
                records, rows = judge_batch(batch, texts, [len(s.response_ids) for s in samples],
                                            scores, settings, k)
                store.append_rows(rows)
            maybe_kill(number, "rows", store.dataset_path if store is not None else None)
            if store is not None:
                store.record_progress(records)
                for record in records:
                    tally.add(record)
                stats = tally.as_dict()
                store.write_stats(stats)
                print_rank0(progress_line(stats, number, len(batches),
                                          time.perf_counter() - start))
            dist.barrier()
            maybe_kill(number, "after")
    finally:
        if rules is not None:
            rules.close()
    if stats is not None:
        print_rank0(f"[r1mega sample] done: {stats['kept']} rows from {stats['prompts_done']} "
                    f"prompts ({100 * stats['acceptance_rate']:.1f}% of "
                    f"{stats['samples_generated']} samples kept) in "
                    f"{os.path.join(cfg.sample.output_dir, 'dataset.jsonl')}")
        if stats["kept"] == 0:
            reasons = ", ".join(f"{k}={v}" for k, v in stats["dropped"].items() if v)
            print_rank0("[r1mega sample] WARNING: no sample passed the filters "
                        f"(dropped: {reasons or 'none'}); the dataset is empty. Loosen "
                        "sample.min_reward / sample.readability or sample more prompts")
    dist.barrier()
    return stats
