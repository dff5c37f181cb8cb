"""From one batch's scored samples to dataset rows and progress records (rank 0).

The glue between generation and the output files: for each prompt of the batch, its
``samples_per_prompt`` samples go through :func:`r1mega.rejection.filtering.select`, the
kept ones become SFT rows, and every outcome goes into the prompt's progress record.
Pure Python, so it is tested without processes or a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from r1mega.rejection.filtering import Candidate, FilterSettings, select
from r1mega.rejection.prompts import SamplingPrompt
from r1mega.rejection.store import PromptOutcome


def judge_batch(prompts: Sequence[SamplingPrompt], texts: Sequence[str],
                num_tokens: Sequence[int], scores: Sequence[float],
                settings: FilterSettings, per_prompt: int
                ) -> tuple[list[PromptOutcome], list[dict[str, Any]]]:
    """Progress records and rows for ``prompts``; the other arguments hold
    ``per_prompt`` entries per prompt, prompt-major (as the batch was generated)."""
    if not len(texts) == len(num_tokens) == len(scores) == len(prompts) * per_prompt:
        raise ValueError(f"{len(prompts)} prompts x {per_prompt} samples do not match "
                         f"{len(texts)} texts / {len(num_tokens)} lengths / {len(scores)} scores")
    records: list[PromptOutcome] = []
    rows: list[dict[str, Any]] = []
    for p, prompt in enumerate(prompts):
        span = range(p * per_prompt, (p + 1) * per_prompt)
        candidates = [Candidate(texts[i], int(num_tokens[i]), float(scores[i])) for i in span]
        outcomes = select(candidates, prompt.kind, settings)
        records.append(PromptOutcome(
            prompt_index=prompt.index, source=prompt.source, kind=prompt.kind,
            outcomes=outcomes, tokens=[c.num_tokens for c in candidates],
            chars=[len(c.response) for c in candidates]))
        rows.extend({"prompt": prompt.example.prompt, "response": c.response,
                     "reward": c.score, "source": prompt.example.source,
                     "prompt_index": prompt.index, "response_tokens": c.num_tokens}
                    for c, outcome in zip(candidates, outcomes, strict=True) if outcome is None)
    return records, rows
