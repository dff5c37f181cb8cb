"""Supervised fine-tuning: DeepSeek-R1's cold start, its large SFT stage, and distillation.

One job for all three: rows of (prompt, response) are tokenized behind the RL template
(:mod:`r1mega.sft.data`), optionally filtered for readability, drawn in a seeded,
resumable epoch order, laid out as padded or THD-packed microbatches
(:mod:`r1mega.sft.batching`) and trained with the mean cross-entropy over response tokens
(:mod:`r1mega.sft.step`) on the same megatron-core model, layouts, optimizer, checkpoints
and W&B monitoring as RL (:mod:`r1mega.sft.trainer`). Distillation is the same training
for a student model on a teacher's rejection-sampled data (:mod:`r1mega.sft.provenance`
reports where that data came from). :mod:`r1mega.sft.coldstart` generates a small
cold-start set for the built-in arithmetic task, so the tiny configs need no download.

Nothing here imports torch at package import time.
"""
