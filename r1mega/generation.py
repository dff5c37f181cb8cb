"""`r1mega generate CHECKPOINT`: sample completions of prompts with the rollout engine.

The same path RL rollouts take: the checkpoint loads in the training layout, the weights
are resharded into the generation layout and the engine decodes (KV cache, continuous
batching). Useful to look at what a policy writes, and as a smoke test of a checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.distributed as dist

from r1mega.bootstrap import start_job
from r1mega.data.templates import apply_template
from r1mega.rollout.colocated import generation_layout_for
from r1mega.rollout.driver import build_sampler, request_seed
from r1mega.rollout.types import SamplingParams


def run_generate(cfg: Any, checkpoint: str, prompts: list[str], n: int, params: SamplingParams,
                 template: str, seed: int, output: str | None) -> list[dict[str, Any]]:
    """``n`` completions per prompt; rank 0 prints them (and writes JSONL to ``output``)."""
    job, policy = start_job(cfg, checkpoint, seed=seed)
    env, tokenizer = job.env, job.tokenizer
    sampler = build_sampler(generation_layout_for(cfg, env.world_size), policy, None, tokenizer)
    rows = [p for p in prompts for _ in range(n)]
    ids = [tokenizer.encode(apply_template(template, p, tokenizer)) for p in rows]
    params = SamplingParams(**{**params.__dict__, "eos_id": tokenizer.eos_id,
                               "pad_id": tokenizer.pad_id})
    samples = sampler.generate(ids, params, [request_seed(seed, 0, i) for i in range(len(rows))],
                               list(cfg.rollout.stop), tokenizer.decode)
    records = [{"prompt": p, "completion": tokenizer.decode(s.response_ids),
                "tokens": len(s.response_ids), "stop_reason": s.stop_reason,
                "prompt_ids": list(prompt_ids), "completion_ids": list(s.response_ids)}
               for p, prompt_ids, s in zip(rows, ids, samples, strict=True)]
    if env.rank == 0:
        for i, record in enumerate(records):
            print(f"--- [{i // n}.{i % n}] {record['tokens']} tokens, "
                  f"{record['stop_reason']}\n{record['completion']}", flush=True)
        if output:
            Path(output).write_text("".join(json.dumps(r) + "\n" for r in records))
    dist.barrier()
    return records
