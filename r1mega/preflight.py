"""Checks that are cheap, run before any process starts (and before the tiny base model
is pretrained on first use), so a wrong path or size fails in a second with one message
naming the key, instead of minutes later as a traceback from every rank:

* **data**: every prompt file the job reads exists, parses, and has a usable row with
  the configured fields (a missing, empty or all-malformed file; a Parquet file without
  the column). Only the first rows are read; a file whose rows are all malformed is
  read to its end to be sure;
* **vocabulary**: the tokenizer loads and its ids fit the model's embedding
  (``model.vocab_size``);
* **rollout budget** (RL): the longest prompt seen, templated and tokenized, plus
  ``rollout.max_new_tokens`` fits ``train.seq_length`` (otherwise every long response
  would be cut before training, silently).

All problems are reported together as one :class:`~r1mega.config.ConfigError`.
"""

from __future__ import annotations

from typing import Any

from r1mega.config.validate import ConfigError
from r1mega.data.prompts import PromptDataset, PromptExample
from r1mega.data.tasks import builtin_dataset, is_builtin

__all__ = ["check_before_launch"]

#: Rows read per prompt file: enough to find a usable one and a realistic prompt length.
SAMPLE_ROWS = 256


def _examples(key: str, path: str, prompt_field: str, answer_field: str | None,
              require_answer: bool, seed: int, errors: list[str]) -> list[PromptExample]:
    """The first rows of one prompt source, or [] with the problem recorded."""
    try:
        if is_builtin(path):
            return builtin_dataset(str(path), "train", seed, size=SAMPLE_ROWS)
        return list(PromptDataset(path, prompt_field=prompt_field,
                                  answer_field=answer_field, require_answer=require_answer,
                                  max_warnings=0, max_examples=SAMPLE_ROWS))
    except (OSError, ValueError) as e:
        errors.append(f"{key}={path}: {e}")
        return []


def _prompt_sources(cfg: Any, command: str) -> list[tuple[str, str, str, str | None, bool]]:
    """(config key, path, prompt field, answer field, answer required) of every prompt
    file ``command`` reads."""
    data = cfg.data
    if command in ("sft", "distill"):
        path = cfg.sft.train_path
        if not path or str(path).startswith("builtin:"):
            return []  # unset: the job names it; built-in cold-start rows need no check
        return [("sft.train_path", str(path), cfg.sft.prompt_field, cfg.sft.response_field,
                 True)]
    if command == "sample" and cfg.sample.prompts_path:
        return [("sample.prompts_path", str(cfg.sample.prompts_path), data.prompt_field,
                 data.answer_field, True)]
    if data.sources:
        return [(f"data.sources[{i}].path", str(s.path), s.prompt_field or data.prompt_field,
                 (s.answer_field or data.answer_field) if s.reward == "rules" else None,
                 s.reward == "rules")
                for i, s in enumerate(data.sources)]
    if data.train_path:
        return [("data.train_path", str(data.train_path), data.prompt_field, data.answer_field,
                 True)]
    return []


def _tokenizer(cfg: Any, errors: list[str]) -> Any:
    from r1mega.data.tokenizers import build_tokenizer

    try:
        tokenizer = build_tokenizer(cfg.tokenizer)
    except (OSError, ValueError) as e:
        errors.append(f"tokenizer: {e}")
        return None
    if tokenizer.vocab_size > cfg.model.vocab_size:
        errors.append(f"model.vocab_size={cfg.model.vocab_size} is smaller than the "
                      f"tokenizer's {tokenizer.vocab_size} tokens (tokenizer.type="
                      f"{cfg.tokenizer.type}): its ids would index past the embedding")
    return tokenizer


def _rollout_budget(cfg: Any, tokenizer: Any, examples: list[PromptExample],
                    errors: list[str]) -> None:
    from r1mega.data.templates import apply_template

    if not examples:
        return
    try:
        lengths = [(len(tokenizer.encode(apply_template(cfg.data.template, ex.prompt,
                                                        tokenizer))), ex.source)
                   for ex in examples]
    except (ValueError, TypeError) as e:
        errors.append(f"data.template={cfg.data.template}: {e}")
        return
    longest, source = max(lengths)
    budget = longest + cfg.rollout.max_new_tokens
    # A rollout row holds at most seq_length + 1 tokens (inputs and shifted targets).
    if budget > cfg.train.seq_length + 1:
        errors.append(
            f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} plus the longest prompt "
            f"({longest} tokens with the {cfg.data.template} template, {source}) is {budget} "
            f"tokens, more than train.seq_length={cfg.train.seq_length} (+1) holds: long "
            "responses would be cut before training; raise train.seq_length or lower "
            "rollout.max_new_tokens")


def check_before_launch(cfg: Any, command: str) -> None:
    """Run the checks of the module docstring for the job ``command`` (train, sample, sft,
    distill); raises :class:`ConfigError` listing every problem."""
    errors: list[str] = []
    examples: list[PromptExample] = []
    for key, path, prompt_field, answer_field, required in _prompt_sources(cfg, command):
        examples += _examples(key, path, prompt_field, answer_field, required,
                              cfg.train.seed, errors)
    tokenizer = _tokenizer(cfg, errors)
    if command == "train" and tokenizer is not None:
        _rollout_budget(cfg, tokenizer, examples, errors)
    if errors:
        raise ConfigError("\n".join(errors), errors)
