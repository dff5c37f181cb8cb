"""Warm-start a tiny *base* model for the built-in tasks, so R1-Zero RL has something to do.

R1-Zero starts from a base model that already follows the template now and then; RL
only sharpens what sampling sometimes finds. A randomly initialised tiny model never
emits ``<answer>`` by chance, so every reward is 0, every GRPO advantage is 0 and
nothing is learned. :func:`pretrain_base` fixes that in about three CPU minutes with
plain next-token training on generated text:

    <R1-Zero template with "What is 3 + 4?"> <think> 3 + 4 </think> <answer> 7 </answer></s>

The completions are deliberately imperfect, like a weak base model's: only
``format_frac`` of them have the strict think/answer layout (the rest drop a tag or
answer in prose), and only ``correct_frac`` give the right sum (the others are off by
1 or 2). A model fitted to this text emits the format sometimes but not reliably and is
right less often than it is well formatted -- the gap the format and accuracy rewards
can close. Three minutes do not fit it fully, which widens that gap at temperature 1.
The loss covers completion tokens only: the template is fixed text the policy never has
to produce.

Measured 2026-12-01 (``configs/tiny_cpu.yaml``: ``builtin:add_small``,
``rollout.max_new_tokens=48``; the defaults below; one core of a shared 2-core machine):
800 steps in 168-192 s wall (172-182 s CPU) for seeds 1234-1236; held-out completion
loss 6.274 -> 0.088 (seed 1234); a cached call returns in 2 s. Sampled with the rollout
engine at temperature 1, 16 times each on the 20 held-out problems (seed 1234): strict
format 0.56, an ``<answer>`` block 0.67, accuracy 0.22 (``r1mega eval --k 32``: pass@1
0.228); 8 times each on 20 train problems: format 0.54, accuracy 0.31; greedy on the
held-out ones: format 1.00, accuracy 0.40 (train: 0.75). Held-out pass@1 at T=1 (k=32)
for seeds 1235 and 1236: 0.309 and 0.214. RL on ``configs/tiny_cpu.yaml`` raised the
format rate to ~0.9, and held-out pass@1 by 0.08-0.15 (2026-12-01).

Why these defaults (same date and machine, held-out pass@1 at T=1 unless said): the
earlier ``correct_frac=0.6`` / 600 steps gave 0.09-0.10 (greedy 0.35), and RL's gain on
it was small and fragile (held-out correctness fell as the policy fitted the 80 train
pairs). ``correct_frac=0.9`` roughly doubles the held-out accuracy of the base model, but
at 600 steps one seed in three came out weak (0.06-0.08 against 0.17-0.22), and RL then
gained nothing held-out; 800 steps fixed that seed (0.21). A lower ``format_frac`` would
leave RL more format to learn, but at 0.45 (one run) and 0.3 (three runs, two seeds)
the model stopped copying the operands into the think block (2-19% of samples against
65-87%) and its answers were near chance. ``correct_frac=1.0`` (600 steps, one seed) was worse
(0.06). A formatted answer is 45 byte tokens, so an RL budget of
``rollout.max_new_tokens=32`` cuts every response before ``</answer>`` (format and
accuracy 0.00); :func:`response_budget_warning` says so.

``builtin:count_on`` (``configs/r1_zero_tiny_cpu.yaml``) has two styles of completion
(:mod:`r1mega.data.count_on`): a direct answer, a guess right ``direct_correct`` of the
time, and a worked one that counts on and is always right. The base model must *know*
the worked procedure yet rarely *choose* it, so that RL has something to discover:
``worked_frac`` (three quarters) of the rows are worked, so that most of the text
practises the procedure, and :func:`two_style_row` scales the loss on the worked rows'
first worked token so that the fitted probability of starting it is ``worked_prior``
(0.3; about 0.2 of samples at T=0.6). The procedure is learnt in the short contexts;
what varied with the seed was how well it carried over to the full template RL samples
under, so the task weights the full-template rows 4x (``full_weight``,
:func:`full_template_batch`). Measured 2026-12-06 (800 steps, 280-350 s on one core of a
shared machine; 128 held-out problems x 4 samples at T=0.6, the response started as
`` <think> a + b:`` to force the worked style, after the full template or after the short
context):

    seed  worked style right (full template / short context)     natural pass@1
          worked_frac 0.5 or 0.75, full_weight 1   0.75, full_weight 4 (the default)
    1234  0.90 / 0.98 (0.5)                         0.96 / 0.95                 0.25
    1235  0.52 / 0.96 (0.75)                        0.94 / 0.92                 0.22
    1236  0.75 / 0.96 (0.75)                        0.98 / 0.98                 0.22

With equal weights the slips under the full template were miscopied operands in the first
step (``60 + 8: 70 8, ...``) and carries (``29 3, 39 2``). A ``worked_prior`` of 0.2
started RL lower (pass@1 0.11-0.23) and seed 1236's base model then counted on less
reliably (held-out pass@1 0.54 after 25 RL steps).

Counting on at all needs ``model.qk_pos_emb_head_dim: 16`` and
``model.rope_theta: 1000``: with tiny_cpu.yaml's 8 rotary dimensions at theta 10,000, 800
steps (2026-12-03) left the worked style right 27% of the time (it miscounted and
miscopied operands), and 18 RL steps from that model took held-out pass@1 from 0.07 to
0.02.

It reuses the trainer's machinery (``build_policy``, ``forward_backward``, ``lm_loss``,
megatron's optimizer and LR schedule) on one process with every parallel size 1, and
saves with :func:`~r1mega.checkpointing.model_io.save_model`, a distributed checkpoint
that loads at any layout (the RL job's PP=2 included). The result is cached: the output
directory's ``meta.json`` records a hash of everything that determines the weights, and
a second call with the same settings returns the stored model without training.
Training is deterministic for a fixed seed (same CPU thread count).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from r1mega.data.prompts import PromptExample

WEIGHTS = "weights"
META = "meta.json"
FORMAT_VERSION = 1  # bump when the generated text, the tasks' problems or the recipe change

DEFAULT_STEPS = 800
DEFAULT_BATCH_SIZE = 4  # full-template sequences per step in the final phase
DEFAULT_SHORT_BATCH_SIZE = 16  # short-context sequences per step, every step
DEFAULT_FULL_FRAC = 0.3  # the last 30% of the steps add full-template sequences
DEFAULT_LR = 1e-2
DEFAULT_SLOT_WEIGHT = 4.0
DEFAULT_CORRECT_FRAC = 0.9
DEFAULT_FORMAT_FRAC = 0.6
DEFAULT_WORKED_FRAC = 0.75  # two-style tasks: most rows practise the procedure
DEFAULT_WORKED_PRIOR = 0.3
DEFAULT_DIRECT_CORRECT = 0.2
DEFAULT_FULL_WEIGHT = 1.0  # loss weight of a full-template row relative to a short one
# Defaults that differ by task, applied under explicit options. count_on's completions are
# longer and its answers depend on every digit of a 2-digit operand: with add_small's 30%
# of steps on full-template text it miscopied the operand there (held-out completion loss
# 0.12 against 0.04-0.07 with 50%, 2026-12-03).
# Its 4 full-template rows per step (against 16 short ones) carried ~20% of the gradient;
# weighted 4x they carry half, at no extra compute, and the worked style sampled under the
# full template was right 0.94-0.98 of the time instead of 0.52-0.75 (seeds 1235-1236,
# 2026-12-06; the short-context rate was ~0.96 either way).
TASK_DEFAULTS: dict[str, dict[str, Any]] = {"builtin:count_on": {"full_frac": 0.5,
                                                                  "full_weight": 4.0}}


@dataclass(frozen=True)
class PretrainSettings:
    """Everything besides the model config that determines the pretrained weights."""

    task: str  # a builtin:<task> data path
    steps: int = DEFAULT_STEPS
    seed: int = 1234
    batch_size: int = DEFAULT_BATCH_SIZE
    short_batch_size: int = DEFAULT_SHORT_BATCH_SIZE
    full_frac: float = DEFAULT_FULL_FRAC
    lr: float = DEFAULT_LR
    slot_weight: float = DEFAULT_SLOT_WEIGHT
    correct_frac: float = DEFAULT_CORRECT_FRAC
    format_frac: float = DEFAULT_FORMAT_FRAC
    # tasks with a direct and a worked style (builtin:count_on)
    worked_frac: float = DEFAULT_WORKED_FRAC
    worked_prior: float = DEFAULT_WORKED_PRIOR
    direct_correct: float = DEFAULT_DIRECT_CORRECT
    full_weight: float = DEFAULT_FULL_WEIGHT

    def __post_init__(self) -> None:
        """Refuse settings that would train on nothing, before any model is built."""
        if min(self.steps, self.batch_size, self.short_batch_size) < 1:
            raise ValueError("steps, batch_size and short_batch_size must be >= 1")
        for name in ("full_frac", "correct_frac", "format_frac", "worked_frac",
                     "worked_prior", "direct_correct"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} is not in [0, 1]")
        if not self.full_weight > 0:
            raise ValueError(f"full_weight={self.full_weight} must be > 0")

    @property
    def first_full_step(self) -> int:
        """The first step that also trains on full-template sequences."""
        return self.steps - round(self.steps * self.full_frac) + 1


@dataclass
class PretrainResult:
    """Where the weights are and how training went (also the content of ``meta.json``)."""

    weights: str  # directory for checkpoint.load / load_model
    cache_key: str
    settings: dict[str, Any]
    model_hash: str
    initial_eval_loss: float  # held-out completion loss of the untrained model
    final_eval_loss: float
    final_train_loss: float  # last step, slot-weighted
    train_seconds: float  # wall clock
    train_cpu_seconds: float  # this process's CPU time: comparable on a shared machine
    reused: bool = False


# ----------------------------------------------------------------------------- text


def formatted_completion(expression: str, value: int) -> str:
    """The strict R1 layout the format reward looks for, as the pretraining text writes it."""
    return f" <think> {expression} </think> <answer> {value} </answer>"


def correct_completion(example: PromptExample) -> str:
    """The longest correct, well-formatted completion the base-model text has for
    ``example``: the worked one for a two-style task, else the formatted one."""
    if is_two_style(example):
        from r1mega.data.count_on import worked_text

        return worked_text(example.metadata["a"], example.metadata["b"])
    return formatted_completion(example.metadata.get("expression") or example.prompt,
                                int(example.answer or 0))


def longest_formatted_completion(tokenizer: Any, examples: Sequence[PromptExample]) -> int:
    """Tokens in the longest correct, well-formatted completion of ``examples`` (EOS not
    counted: rollouts stop at ``</answer>``)."""
    return max(len(tokenizer.encode(correct_completion(ex))) for ex in examples)


def response_budget_warning(cfg: Any, task: str) -> str | None:
    """Why RL sampling from this model could never earn a reward, or None.

    The weights do not depend on ``rollout.max_new_tokens``, so this is a warning, not an
    error; but a budget shorter than a formatted answer truncates every response before
    ``</answer>`` and both rewards stay 0 (with the byte tokenizer the four tags alone are
    32 tokens).
    """
    from r1mega.data.tasks import builtin_dataset
    from r1mega.data.tokenizers import build_tokenizer

    needed = longest_formatted_completion(build_tokenizer(cfg.tokenizer),
                                          builtin_dataset(task, "train", cfg.train.seed))
    budget = cfg.rollout.max_new_tokens
    if budget >= needed:
        return None
    return (f"rollout.max_new_tokens={budget} is shorter than a formatted answer to "
            f"{task} ({needed} tokens at the longest): a response that long is cut before "
            f"</answer> and scores 0; use rollout.max_new_tokens>={needed} for RL and "
            f"sampling")


def completion_text(example: PromptExample, rng: random.Random, correct_frac: float,
                    format_frac: float) -> str:
    """One imperfect base-model completion of ``example`` (it follows ``Assistant:``).

    The chain of thought restates the problem (``3 + 4``): the operands then sit ~20
    tokens before the answer, which a tiny model finds far easier to add than digits ~60
    tokens back in the prompt. It does not state the result: copying ``= 7`` from the
    thought into the answer block is an induction-style lookup a 2-minute model does not
    learn reliably, and at temperature 1 it wrote one sum in the thought and another in the
    answer; with one place for the result, correctness is one decision. Wrong answers are
    near misses (off by 1 or 2), as a sloppy model's would be. Few broken layouts, each
    clearly different: every extra variant is one more branch an under-trained model
    blends at temperature 1.
    """
    expression = example.metadata.get("expression") or example.prompt
    value = int(example.answer or 0)
    if rng.random() >= correct_frac:
        value += rng.choice((-2, -1, 1, 2))
    if rng.random() < format_frac:
        return formatted_completion(expression, value)
    broken = (
        f" {expression}. The answer is {value}.",  # no tags at all
        f" <think> {expression} </think> The answer is {value}.",  # no answer block
        f" <answer> {value} </answer>",  # no think block (accuracy can still score)
    )
    return rng.choice(broken)


# A number starts after these: the slots whose tokens are up-weighted.
NUMBER_SLOTS = ("<think> ", "<answer> ", "= ", "+ ", "- ", "* ", "is ")


def slot_weights(tokenizer: Any, completion_ids: Sequence[int], weight: float,
                 is_slot: Callable[[str], bool] | None = None) -> list[float]:
    """Loss weight of each completion token: ``weight`` where a number must start (the
    operand copies and the stated result), 1 elsewhere.

    The weight depends only on the text *before* the token, never on the token itself, so
    it changes how much each position counts but not what distribution each position is
    fitted to. (Up-weighting digit *labels* instead biases every position where a digit
    and a non-digit are both possible towards the digit -- garbage at temperature 1.)
    """
    if weight == 1.0:
        return [1.0] * len(completion_ids)
    is_slot = is_slot or (lambda before: before.endswith(NUMBER_SLOTS))
    return [weight if is_slot(tokenizer.decode(list(completion_ids[:i]))) else 1.0
            for i in range(len(completion_ids))]


def prompt_text(template: str, example: PromptExample, tokenizer: Any, short: bool) -> str:
    """The context a completion follows: the templated prompt, exactly what rollouts sample
    from (no BOS), or with ``short`` only its last ``User: ...`` turn.

    Short contexts are the cheap half of the curriculum (see :func:`pretrain_base`): the
    operands sit at the same distance from the completion as in the full template, but
    without the ~400 bytes of preamble (which even contains ``<think>``/``<answer>`` tags
    that distract a model still learning where to look).
    """
    from r1mega.data.templates import apply_template

    text = apply_template(template, example.prompt, tokenizer)
    if short:
        turn = text.rfind("User: ")
        return text[turn:] if turn >= 0 else text
    return text


def encode_example(tokenizer: Any, context: str, completion: str, slot_weight: float = 1.0,
                   is_slot: Callable[[str], bool] | None = None
                   ) -> tuple[list[int], list[int], list[float]]:
    """(context ids, completion ids + EOS, completion loss weights); EOS so the model
    learns to stop. ``is_slot`` as in :func:`slot_weights`."""
    ids = tokenizer.encode(completion) + [tokenizer.eos_id]
    return tokenizer.encode(context), ids, slot_weights(tokenizer, ids, slot_weight, is_slot)


def lm_batch(rows: Sequence[tuple[list[int], list[int], list[float]]], pad_id: int
             ) -> dict[str, torch.Tensor]:
    """A causal-LM batch whose loss mask holds the completion tokens' weights (0 on the
    context and padding), padded to the longest row; padding sits at the end, where causal
    attention never lets a real token see it. ``lm_loss`` sums ``loss * mask`` and
    megatron divides by the mask's sum, so weights make a weighted mean."""
    from r1mega.training.batches import causal_lm_batch

    width = max(len(p) + len(c) for p, c, _ in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width - 1), dtype=torch.float32)
    for i, (prompt, completion, weights) in enumerate(rows):
        ids = prompt + completion
        tokens[i, :len(ids)] = torch.tensor(ids)
        # label j is token j + 1: the completion's tokens are labels len(prompt)-1 onwards
        mask[i, len(prompt) - 1:len(ids) - 1] = torch.tensor(weights)
    return causal_lm_batch(tokens, mask)


def sample_batch(tokenizer: Any, template: str, examples: Sequence[PromptExample],
                 rng: random.Random, n: int, short: bool, settings: PretrainSettings,
                 weighted: bool = True) -> dict[str, torch.Tensor]:
    """``n`` generated training sequences on problems drawn from ``examples``."""
    rows = []
    for ex in (rng.choice(examples) for _ in range(n)):
        if is_two_style(ex):
            rows.append(two_style_row(tokenizer, prompt_text(template, ex, tokenizer, short),
                                      ex, rng, settings, weighted))
            continue
        completion = completion_text(ex, rng, settings.correct_frac, settings.format_frac)
        rows.append(encode_example(tokenizer, prompt_text(template, ex, tokenizer, short),
                                   completion, settings.slot_weight if weighted else 1.0))
    return lm_batch(rows, tokenizer.pad_id)


def full_template_batch(tokenizer: Any, template: str, examples: Sequence[PromptExample],
                        rng: random.Random, settings: PretrainSettings
                        ) -> dict[str, torch.Tensor]:
    """The final phase's ``batch_size`` full-template sequences, their loss weighted by
    ``full_weight`` against the step's short-context rows. The skill the short rows teach
    has to carry over to the ~430-byte preamble RL samples under; at equal weight the few
    full rows are a small share of each step's loss, and how well it carried over varied
    with the seed."""
    batch = sample_batch(tokenizer, template, examples, rng, settings.batch_size, False,
                         settings)
    batch["loss_mask"] *= settings.full_weight
    return batch


# where a number starts in the two-style tasks' text: operands, sums, counting steps
TWO_STYLE_SLOTS = ("<think> ", "<answer> ", "= ", "+ ", ": ", ", ")
TWO_STYLE_TASKS = ("count_on",)  # tasks whose base-model text has a direct and a worked style


def is_two_style(example: PromptExample) -> bool:
    return example.metadata.get("task") in TWO_STYLE_TASKS


def two_style_row(tokenizer: Any, context: str, example: PromptExample,
                  rng: random.Random, settings: PretrainSettings, weighted: bool
                  ) -> tuple[list[int], list[int], list[float]]:
    """A worked (``worked_frac`` of rows) or direct base-model completion of a task with
    both styles (:func:`r1mega.data.count_on.base_completion`).

    The procedure is learned from many worked rows, but a base model should *start* the
    worked style rarely, so that RL has something to discover: weighted rows scale the
    loss of a worked row's first worked token (where it departs from the direct text) by
    :func:`style_weight`, which makes the fitted probability of that choice
    ``worked_prior``. The other tokens are weighted as :func:`in_number` says.
    """
    from r1mega.data.count_on import base_completion, direct_text

    worked = rng.random() < settings.worked_frac
    text = base_completion(example, rng, worked, settings.direct_correct)
    context_ids, ids, weights = encode_example(
        tokenizer, context, text, settings.slot_weight if weighted else 1.0, in_number)
    if weighted and worked:
        direct = tokenizer.encode(direct_text(example.metadata["a"], example.metadata["b"]))
        split = next(i for i, (x, y) in enumerate(zip(ids, direct, strict=False)) if x != y)
        weights[split] *= style_weight(settings.worked_frac, settings.worked_prior)
    return context_ids, ids, weights


def in_number(before: str) -> bool:
    """Whether the token after ``before`` is up-weighted: after a slot, where a number
    starts, or after a digit, where a number continues or ends. Decided by the text before
    the token only, as in :func:`slot_weights`, so the weights never bias what a position
    is fitted to."""
    return before.endswith(TWO_STYLE_SLOTS) or before[-1:].isdigit()


def style_weight(worked_frac: float, worked_prior: float) -> float:
    """The loss weight on a worked row's style choice that fits the choice's probability to
    ``worked_prior`` when ``worked_frac`` of the rows are worked: solving
    ``f w / (f w + 1 - f) = p`` for ``w``."""
    return worked_prior * (1 - worked_frac) / (worked_frac * (1 - worked_prior))


def heldout_batch(cfg: Any, settings: PretrainSettings, size: int = 24
                  ) -> dict[str, torch.Tensor]:
    """Full-template text on the task's *eval* problems (never trained on), fixed by the
    seed, unweighted: the yardstick for "did pretraining lower the completion loss"."""
    from r1mega.data.tasks import builtin_dataset
    from r1mega.data.tokenizers import build_tokenizer

    tokenizer = build_tokenizer(cfg.tokenizer)
    examples = builtin_dataset(settings.task, "eval", settings.seed, size)
    return sample_batch(tokenizer, cfg.data.template, examples,
                        random.Random(settings.seed + 1), size, short=False,
                        settings=settings, weighted=False)


def completion_loss(policy: Any, batch: dict[str, torch.Tensor], micro_batch_size: int = 8
                    ) -> float:
    """Mean per-token completion loss of ``batch`` (forward only; collective over the
    job, any layout; the value is broadcast from the last pipeline stage)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from r1mega.training.batches import data_parallel_microbatches
    from r1mega.training.schedule import forward_backward, lm_loss

    dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_rank = next(iter(batch.values())).shape[0] // dp_size
    # the largest microbatch size that splits this rank's rows evenly
    mbs = max(m for m in range(1, min(micro_batch_size, per_rank) + 1) if per_rank % m == 0)
    with torch.no_grad():
        stats = forward_backward(policy, data_parallel_microbatches(batch, mbs, dp_rank,
                                                                    dp_size),
                                 lm_loss, forward_only=True)
    total = torch.zeros(2)
    if ps.is_pipeline_last_stage():
        total = torch.stack([s["lm_loss"] for s in stats]).sum(0).float()
        dist.all_reduce(total, group=ps.get_data_parallel_group())
    pp_group = ps.get_pipeline_model_parallel_group()
    last = dist.get_global_rank(pp_group, ps.get_pipeline_model_parallel_world_size() - 1)
    dist.broadcast(total, src=last, group=pp_group)
    return float(total[0] / total[1])


# ----------------------------------------------------------------------------- caching


def single_process_config(cfg: Any) -> Any:
    """``cfg`` with every parallel size 1 and one process (as ``r1mega eval`` does), so
    pretraining runs on one CPU core whatever layout the RL job uses."""
    from omegaconf import OmegaConf

    one = {"tp": 1, "pp": 1, "ep": 1, "etp": 1, "cp": 1, "pp_layers": None,
           "sequence_parallel": False}
    return OmegaConf.merge(cfg, {"train_layout": one, "generation_layout": one,
                                 "launch": {"nproc_per_node": 1},
                                 "checkpoint": {"load": None}})


def model_hash(cfg: Any) -> str:
    """Hash of what fixes the weights' shapes and meaning: model, tokenizer, template."""
    payload = {"model": non_default_fields(cfg.model),
               "precision": cfg.precision.params_dtype,
               "tokenizer": non_default_fields(cfg.tokenizer),
               "template": cfg.data.template}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def non_default_fields(section: Any) -> dict[str, Any]:
    """The fields of a structured config section that differ from its schema's defaults.

    Hashing these rather than every field keeps cached models valid when the schema
    gains a field whose default keeps the old behaviour (as ``model.head: lm`` did); a
    field set away from its default still changes the hash.
    """
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(section, resolve=True)
    defaults = OmegaConf.to_container(OmegaConf.structured(OmegaConf.get_type(section)))
    return {k: v for k, v in values.items() if k not in defaults or defaults[k] != v}


def cache_key(cfg: Any, settings: PretrainSettings) -> str:
    """Hash of everything that determines the weights. The text generator and training
    loop are code: ``FORMAT_VERSION`` is bumped when they change."""
    text = json.dumps({"model": model_hash(cfg), "settings": asdict(settings),
                       "optimizer": optimizer_settings(settings),
                       "version": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_result(out_dir: str | Path, key: str) -> PretrainResult | None:
    """The stored result in ``out_dir`` if it is complete and was made with ``key``."""
    meta_path = Path(out_dir) / META
    if not meta_path.is_file() or not (Path(out_dir) / WEIGHTS).is_dir():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("cache_key") != key:
        return None
    meta["reused"] = True
    meta["weights"] = str(Path(out_dir) / WEIGHTS)
    try:
        return PretrainResult(**meta)
    except TypeError:  # written by another version of this module
        return None


# ----------------------------------------------------------------------------- training


@contextmanager
def single_process_group(seed: int) -> Iterator[None]:
    """A one-process gloo group with every parallel size 1, torn down afterwards.

    Pretraining and :func:`sample_stats` build a world-size-1 model, which cannot live in
    a running job's process groups (and tearing the groups down afterwards would break
    that job), so inside one this refuses: use :func:`ensure_base_model`, which pretrains
    in a subprocess there.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from parallel.layout import Layout, initialize_layout
    from parallel.platform import apply_cpu_platform, default_backend, manual_seed
    from r1mega.launch import free_port

    if dist.is_initialized():
        raise RuntimeError(
            "pretraining runs in a process of its own but torch.distributed is already "
            "initialized here; call ensure_base_model, which runs `python -m "
            "r1mega.pretrain` in a subprocess")
    apply_cpu_platform()
    dist.init_process_group(backend=default_backend(),
                            init_method=f"tcp://127.0.0.1:{free_port()}",
                            rank=0, world_size=1)
    try:
        initialize_layout(Layout(world_size=1))
        manual_seed(seed)
        yield
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def optimizer_settings(settings: PretrainSettings) -> dict[str, Any]:
    """Every ``train.*`` field the optimizer and LR schedule read, set here rather than
    taken from the RL config: the RL job's lr (1e-6-ish) is far too timid for learning
    from scratch, and tuning the RL run must not change (or invalidate) the base model.
    Warmup, then cosine decay to 1% -- the low end matters: the model sampled at
    temperature 1 is much cleaner after it."""
    return {"steps": settings.steps, "lr": settings.lr, "min_lr": settings.lr * 0.01,
            "lr_warmup_steps": min(20, max(settings.steps // 10, 1)),
            "lr_decay_style": "cosine", "weight_decay": 0.0, "adam_beta1": 0.9,
            "adam_beta2": 0.99, "adam_eps": 1e-8, "grad_clip": 1.0,
            "use_distributed_optimizer": False}


def _train_cfg(cfg: Any, settings: PretrainSettings) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.merge(cfg.train, optimizer_settings(settings))


def _train(cfg: Any, settings: PretrainSettings, out_dir: Path, key: str,
           log: Callable[[str], None]) -> PretrainResult:
    """Train, save and record; ``meta.json`` goes first and comes back last, so a run
    killed half way never leaves a cache entry that points at other weights."""
    from r1mega.training.policy import build_policy

    (out_dir / META).unlink(missing_ok=True)
    t0, cpu0 = time.perf_counter(), time.process_time()
    with single_process_group(settings.seed):
        policy = build_policy(cfg.model, cfg.train_layout, cfg.precision)
        heldout = heldout_batch(cfg, settings)
        initial = completion_loss(policy, heldout)
        log(f"[pretrain] {settings.task}: {settings.steps} steps of "
            f"{settings.short_batch_size} short-context sequences, plus "
            f"{settings.batch_size} full-template ones (loss weight {settings.full_weight:g}) "
            f"from step {settings.first_full_step}; lr {settings.lr:g}; held-out completion "
            f"loss {initial:.3f}")
        train_loss = _fit(cfg, settings, policy, lambda: time.perf_counter() - t0, log)
        final = completion_loss(policy, heldout)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
        _save_weights(cfg, policy, out_dir)
    result = PretrainResult(weights=str(out_dir / WEIGHTS), cache_key=key,
                            settings=asdict(settings), model_hash=model_hash(cfg),
                            initial_eval_loss=initial, final_eval_loss=final,
                            final_train_loss=train_loss, train_seconds=seconds,
                            train_cpu_seconds=cpu_seconds)
    _write_meta(out_dir, result)
    log(f"[pretrain] held-out completion loss {initial:.3f} -> {final:.3f} in "
        f"{seconds:.0f}s ({cpu_seconds:.0f}s CPU); saved {out_dir / WEIGHTS}")
    return result


def _fit(cfg: Any, settings: PretrainSettings, policy: Any, elapsed: Callable[[], float],
         log: Callable[[str], None]) -> float:
    """The curriculum's optimizer steps (see :func:`pretrain_base`); returns the last
    step's slot-weighted training loss."""
    from r1mega.data.tasks import builtin_dataset
    from r1mega.data.tokenizers import build_model_tokenizer
    from r1mega.training.optim import build_lr_scheduler, build_optimizer
    from r1mega.training.schedule import forward_backward, lm_loss

    tokenizer = build_model_tokenizer(cfg)
    train_cfg = _train_cfg(cfg, settings)
    optimizer = build_optimizer(policy, train_cfg, cfg.precision)
    # This loop advances the schedule after each update (update k runs at position k - 1,
    # the first at LR 0), so a decay over steps - 1 positions spans exactly the run's
    # updates; the base model's recipe was tuned with this schedule.
    scheduler = build_lr_scheduler(optimizer, train_cfg, total_updates=settings.steps - 1)
    examples = builtin_dataset(settings.task, "train", settings.seed)
    rng = random.Random(settings.seed)
    train_loss = float("nan")
    for step in range(1, settings.steps + 1):
        microbatches = [sample_batch(tokenizer, cfg.data.template, examples, rng,
                                     settings.short_batch_size, True, settings)]
        if step >= settings.first_full_step:
            microbatches.append(full_template_batch(tokenizer, cfg.data.template, examples,
                                                    rng, settings))
        policy.zero_grad()
        optimizer.zero_grad()
        stats = forward_backward(policy, microbatches, lm_loss)
        optimizer.step()
        scheduler.step(increment=1)
        total = torch.stack([s["lm_loss"] for s in stats]).sum(0)
        train_loss = float(total[0] / total[1])
        if step % 50 == 0 or step == settings.steps:
            log(f"[pretrain] step {step}/{settings.steps} | loss {train_loss:.3f} "
                f"(slot-weighted) | {elapsed():.0f}s")
    return train_loss


def _save_weights(cfg: Any, policy: Any, out_dir: Path) -> None:
    """``out_dir/weights``: the model as a distributed checkpoint (loadable at any layout)
    with the config beside it, which makes it a checkpoint ``r1mega eval`` accepts.
    Written to ``weights.partial`` and renamed."""
    from omegaconf import OmegaConf

    from r1mega.checkpointing.model_io import save_model
    from r1mega.checkpointing.train_state import CONFIG, _results_queue_dies_with_trainer

    partial = out_dir / (WEIGHTS + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    # megatron's writer starts a multiprocessing manager on first save; start it the
    # trainer's way, so it cannot outlive this process if it is killed.
    _results_queue_dies_with_trainer()
    save_model(policy.chunks, str(partial))
    (partial / CONFIG).write_text(OmegaConf.to_yaml(cfg))
    shutil.rmtree(out_dir / WEIGHTS, ignore_errors=True)
    os.replace(partial, out_dir / WEIGHTS)


def _write_meta(out_dir: Path, result: PretrainResult) -> None:
    """``meta.json``, atomically: its presence marks a complete cache entry."""
    meta = asdict(result)
    meta.pop("reused")
    tmp = out_dir / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out_dir / META)


def pretrain_base(cfg: Any, out_dir: str | Path, steps: int = DEFAULT_STEPS, *,
                  seed: int | None = None, task: str | None = None, force: bool = False,
                  log: Callable[[str], None] = print, **options: Any) -> PretrainResult:
    """Pretrain (or reuse) a base model for ``cfg``'s built-in task in ``out_dir``.

    The curriculum: every step trains on ``short_batch_size`` sequences whose context is
    only the ``User: ...  Assistant:`` turn (cheap: ~80 tokens), where a tiny model learns
    the format and to copy the operands within a couple of hundred steps; the last
    ``full_frac`` of the steps add ``batch_size`` sequences with the full ~430-byte
    R1-Zero template, which carries that skill over to the context RL samples in
    (without them the model copies nothing there). Training on full-template text from
    the start costs ~6x more per sequence and had learned no copying in the same budget.

    Args:
        cfg: an r1mega config; its model, precision, tokenizer and data.template are
            used, its layouts are replaced by all-1s (one process, this one).
        out_dir: cache directory; gets ``weights/`` (a distributed checkpoint plus
            ``r1mega_config.yaml``) and ``meta.json``.
        steps: optimizer steps.
        seed: weights init, problem order and completion noise (default cfg.train.seed).
        task: a ``builtin:<task>`` path (default cfg.data.train_path).
        force: retrain even if a matching cached model exists.
        options: other :class:`PretrainSettings` fields (batch_size, short_batch_size,
            full_frac, full_weight, lr, slot_weight, correct_frac, format_frac,
            worked_frac, worked_prior, direct_correct).

    Returns:
        The result; ``reused`` is True when the cache was hit (no training happened).
        Must run in a process that is not part of a multi-rank job (see
        :func:`ensure_base_model`, which handles that case).
    """
    settings = make_settings(cfg, steps, seed, task, options)
    warning = response_budget_warning(cfg, settings.task)
    if warning:
        log(f"[pretrain] warning: {warning}")
    cfg = single_process_config(cfg)
    out = Path(out_dir)
    key = cache_key(cfg, settings)
    if not force:
        cached = cached_result(out, key)
        if cached is not None:
            log(f"[pretrain] reusing {cached.weights} (cache key {key})")
            return cached
    out.mkdir(parents=True, exist_ok=True)
    return _train(cfg, settings, out, key, log)


def make_settings(cfg: Any, steps: int, seed: int | None, task: str | None,
                  options: dict[str, Any]) -> PretrainSettings:
    """The settings a call means, defaults filled from ``cfg`` (seed: train.seed, task:
    data.train_path); one place, so every caller computes the same cache key."""
    from r1mega.data.tasks import is_builtin

    task = task or cfg.data.train_path
    if not is_builtin(task):
        raise ValueError(f"pretraining generates text for a builtin:<task> data path, got "
                         f"{task!r}")
    given = {name: value for name, value in options.items() if value is not None}
    return PretrainSettings(task=task, steps=steps,
                            seed=cfg.train.seed if seed is None else seed,
                            **{**TASK_DEFAULTS.get(task, {}), **given})


# ----------------------------------------------------------------------------- sampling


@dataclass
class SampleStats:
    """How a model does on the task when sampled the way RL and eval sample it."""

    temperature: float
    samples: int
    format_rate: float  # strict think/answer layout
    accuracy: float  # correct answer in the last <answer> block (math-verify)
    examples: list[str]


def sample_stats(cfg: Any, weights: str | Path, problems: int = 20, per_problem: int = 4,
                 temperatures: Sequence[float] = (1.0, 0.0), split: str = "eval",
                 task: str | None = None) -> list[SampleStats]:
    """Load ``weights`` on one process and sample ``per_problem`` responses (1 when greedy)
    to ``problems`` problems of ``split``; score format and accuracy with the RL rewards.
    Sampling is the RL job's: its ``rollout.max_new_tokens`` and stop strings, so these
    are the rates the first GRPO steps would see."""
    from r1mega.checkpointing.model_io import load_model
    from r1mega.data.tasks import builtin_dataset
    from r1mega.rewards import RewardFunction
    from r1mega.training.policy import build_policy

    cfg = single_process_config(cfg)
    examples = builtin_dataset(task or cfg.data.train_path, split, cfg.train.seed, problems)
    reward = RewardFunction.from_config({"specs": [{"name": "accuracy", "weight": 1.0}]})
    results = []
    try:
        with single_process_group(cfg.train.seed):
            policy = build_policy(cfg.model, cfg.train_layout, cfg.precision)
            load_model(policy.chunks, str(weights))
            for temperature in temperatures:
                rows = [ex for ex in examples for _ in range(per_problem if temperature else 1)]
                texts = _sample_responses(cfg, policy, rows, temperature)
                results.append(_score(reward, rows, texts, temperature))
    finally:
        reward.close()
    return results


def _sample_responses(cfg: Any, policy: Any, rows: Sequence[PromptExample],
                      temperature: float) -> list[str]:
    """One response per row, sampled as rollouts sample (template, budget, stop strings)
    with the simple sampler, which needs nothing but the training-layout policy."""
    from r1mega.data.templates import apply_template
    from r1mega.data.tokenizers import build_tokenizer
    from r1mega.rollout.driver import request_seed
    from r1mega.rollout.simple_sampler import generate
    from r1mega.rollout.types import SamplingParams

    tokenizer = build_tokenizer(cfg.tokenizer)
    prompts = [tokenizer.encode(apply_template(cfg.data.template, ex.prompt, tokenizer))
               for ex in rows]
    params = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=temperature,
                            eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    samples = generate(policy, prompts, params,
                       [request_seed(cfg.train.seed, 0, r) for r in range(len(rows))],
                       micro_batch_size=len(rows),
                       stop_sequences=[tokenizer.encode(s) for s in cfg.rollout.stop])
    return [tokenizer.decode(s.response_ids) for s in samples]


def _score(reward: Any, rows: Sequence[PromptExample], texts: list[str], temperature: float
           ) -> SampleStats:
    """Strict format rate and math-verify accuracy of ``texts``, the RL rewards' verdicts."""
    from r1mega.rewards import RewardInput, format_ok

    _, per_reward = reward([RewardInput(prompt=ex.prompt, response=t, answer=ex.answer)
                            for ex, t in zip(rows, texts, strict=True)])
    acc = per_reward["accuracy"]
    return SampleStats(temperature=temperature, samples=len(texts),
                       format_rate=sum(format_ok(t) for t in texts) / len(texts),
                       accuracy=sum(acc) / len(acc), examples=texts[:8])


# ----------------------------------------------------------------------------- CLI


def _pretrain_in_subprocess(cfg: Any, out_dir: Path, steps: int, seed: int | None,
                            task: str | None, options: dict[str, Any]) -> None:
    """Run :func:`main` in a fresh interpreter: for a caller that is one rank of a job,
    whose process groups and megatron state pretraining must not touch. The config goes
    over as YAML; launcher variables are dropped so the child is a single process."""
    import subprocess

    from omegaconf import OmegaConf

    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / "source_config.yaml"
    config_path.write_text(OmegaConf.to_yaml(cfg))
    args = [str(config_path), "--out", str(out_dir), "--steps", str(steps)]
    if seed is not None:
        args += ["--seed", str(seed)]
    if task is not None:
        args += ["--task", task]
    for name, value in options.items():
        if value is not None:
            args += ["--" + name.replace("_", "-"), str(value)]
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARIABLES}
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH"))
                                        if p)
    subprocess.run([sys.executable, "-m", "r1mega.pretrain", *args], check=True, env=env)


_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                       "ROLE_RANK", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "MASTER_ADDR",
                       "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
                       "TORCHELASTIC_MAX_RESTARTS", "SLURM_PROCID", "SLURM_NTASKS",
                       "SLURM_LOCALID")


def ensure_base_model(cfg: Any, out_dir: str | Path, steps: int = DEFAULT_STEPS, *,
                      seed: int | None = None, task: str | None = None,
                      **options: Any) -> str:
    """The weights directory of the base model for ``cfg``, pretraining it if not cached.

    Callable from anywhere, including every rank of a running job (collective then), so
    a job can make sure its starting weights exist before ``load_model``: rank 0 checks
    the cache and, on a miss, pretrains in a subprocess (a world-size-1 job cannot be
    built inside the running one); the other ranks wait for its verdict and fail with its
    error if it failed. ``out_dir`` must be visible to every rank (one node, or a shared
    file system). Outside a job it pretrains in this process.
    """
    import torch.distributed as dist

    out = Path(out_dir)
    in_job = dist.is_available() and dist.is_initialized()
    if not in_job:
        return pretrain_base(cfg, out, steps, seed=seed, task=task, **options).weights
    error: list[str | None] = [None]
    if dist.get_rank() == 0:
        try:
            settings = make_settings(cfg, steps, seed, task, options)
            if cached_result(out, cache_key(single_process_config(cfg), settings)) is None:
                _pretrain_in_subprocess(cfg, out, steps, seed, task, options)
        except Exception as err:  # reported to every rank, then raised
            error[0] = f"pretraining the base model into {out} failed: {err}"
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise RuntimeError(error[0])
    return str(out / WEIGHTS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain_tiny",
        description="Warm-start a tiny base model for a built-in task (cached).")
    parser.add_argument("config", help="r1mega YAML config (e.g. configs/tiny_cpu.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. data.train_path=builtin:add_small")
    parser.add_argument("--out", required=True, help="cache directory (weights/, meta.json)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--seed", type=int, default=None, help="default: train.seed")
    parser.add_argument("--task", default=None, help="builtin:<task> (default: "
                        "data.train_path)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help="full-template sequences per step in the final phase")
    parser.add_argument("--short-batch-size", type=int, default=DEFAULT_SHORT_BATCH_SIZE,
                        help="short-context sequences per step")
    parser.add_argument("--full-frac", type=float, default=None,
                        help="fraction of steps (the last ones) with full-template text "
                        f"(default {DEFAULT_FULL_FRAC}; per task: TASK_DEFAULTS)")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR)
    parser.add_argument("--slot-weight", type=float, default=DEFAULT_SLOT_WEIGHT,
                        help="loss weight of the tokens where a number starts")
    parser.add_argument("--correct-frac", type=float, default=DEFAULT_CORRECT_FRAC,
                        help="fraction of training completions with the right answer")
    parser.add_argument("--format-frac", type=float, default=DEFAULT_FORMAT_FRAC,
                        help="fraction of training completions in the strict R1 format")
    parser.add_argument("--worked-frac", type=float, default=DEFAULT_WORKED_FRAC,
                        help="two-style tasks: fraction of completions in the worked style")
    parser.add_argument("--worked-prior", type=float, default=DEFAULT_WORKED_PRIOR,
                        help="two-style tasks: fitted probability of starting the worked style")
    parser.add_argument("--direct-correct", type=float, default=DEFAULT_DIRECT_CORRECT,
                        help="two-style tasks: fraction of direct answers that are right")
    parser.add_argument("--full-weight", type=float, default=None,
                        help="loss weight of a full-template sequence relative to a short "
                        f"one (default {DEFAULT_FULL_WEIGHT}; per task: TASK_DEFAULTS)")
    parser.add_argument("--force", action="store_true", help="retrain even if cached")
    parser.add_argument("--eval", type=int, default=0, metavar="N",
                        help="afterwards, sample N held-out problems (4x at T=1, greedy) "
                        "and print format rate and accuracy")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the budget is one core)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from r1mega.cli import quiet_dependencies
    from r1mega.config import ConfigError, load_config

    args = build_parser().parse_intermixed_args(argv)  # key=value anywhere
    quiet_dependencies()
    torch.set_num_threads(args.threads)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"pretrain: invalid configuration:\n{err}", file=sys.stderr)
        return 2
    result = pretrain_base(cfg, args.out, args.steps, seed=args.seed, task=args.task,
                           force=args.force, batch_size=args.batch_size,
                           short_batch_size=args.short_batch_size, full_frac=args.full_frac,
                           lr=args.lr, slot_weight=args.slot_weight,
                           correct_frac=args.correct_frac, format_frac=args.format_frac,
                           worked_frac=args.worked_frac, worked_prior=args.worked_prior,
                           direct_correct=args.direct_correct, full_weight=args.full_weight)
    print(json.dumps({k: v for k, v in asdict(result).items() if k != "settings"}, indent=2))
    if args.eval:
        print_sample_stats(cfg, result, args.eval)
    return 0


def print_sample_stats(cfg: Any, result: PretrainResult, problems: int) -> None:
    """The ``--eval`` report: format rate and accuracy on held-out problems, sampled at
    temperature 1 (as RL samples) and greedily, with a few responses of each."""
    t0 = time.perf_counter()
    for stats in sample_stats(cfg, result.weights, problems=problems,
                              task=result.settings["task"]):
        mode = "greedy" if stats.temperature == 0 else f"T={stats.temperature:g}"
        print(f"[pretrain eval] {mode}: {stats.samples} samples | format "
              f"{stats.format_rate:.2f} | accuracy {stats.accuracy:.2f}")
        for text in stats.examples[:4]:
            print(f"    {text!r}")
    print(f"[pretrain eval] {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
