"""Prompt templates: how a raw question becomes the text the policy continues.

R1-Zero is trained from a *base* model, so the only instruction it gets is the fixed
template of the DeepSeek-R1 paper (Table 1), kept here verbatim: reward curves are only
comparable to the paper's when the model sees exactly this text. ``chat`` is for
instruction-tuned starting points and defers to the tokenizer's own chat template;
``none`` passes the prompt through for datasets that are already formatted.
"""

from __future__ import annotations

from typing import Any

# DeepSeek-R1 paper, Table 1 (the paper writes "User: prompt. Assistant:").
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning "
    "process here </think> <answer> answer here </answer>. User: {prompt}. Assistant:"
)

TEMPLATE_NAMES = ("r1_zero", "chat", "none")


def _chat_backend(tokenizer: Any) -> Any:
    """The Hugging Face tokenizer behind ``tokenizer`` (our ``HFTokenizer`` or a raw one)."""
    from r1mega.data.tokenizers import HFTokenizer

    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.hf
    if tokenizer is not None and hasattr(tokenizer, "apply_chat_template"):
        return tokenizer
    got = "no tokenizer" if tokenizer is None else type(tokenizer).__name__
    raise ValueError(
        f"template 'chat' needs a Hugging Face tokenizer with a chat template "
        f"(tokenizer.type=hf), got {got}; use data.template=r1_zero or none instead"
    )


def check_template(name: str, tokenizer: Any = None) -> None:
    """Fail at start-up, not at the first rollout, if ``name`` cannot be applied."""
    if name not in TEMPLATE_NAMES:
        raise ValueError(f"unknown template {name!r}: expected one of {', '.join(TEMPLATE_NAMES)}")
    if name == "chat":
        hf = _chat_backend(tokenizer)
        if not getattr(hf, "chat_template", None):
            path = getattr(hf, "name_or_path", "") or "the tokenizer"
            raise ValueError(
                f"template 'chat' needs a chat template, but {path} has none "
                f"(no chat_template in its tokenizer_config.json / chat_template.jinja); "
                f"use data.template=r1_zero or none instead"
            )


def apply_template(name: str, prompt: str, tokenizer: Any = None,
                   open_think: bool = False) -> str:
    """The text the policy is asked to continue for ``prompt`` under template ``name``.

    Args:
        name: ``r1_zero`` | ``chat`` | ``none``.
        prompt: the raw question; inserted as is (no stripping), matching the paper.
        tokenizer: required for ``chat`` (an ``HFTokenizer`` or a transformers tokenizer).
        open_think: end the prompt inside the think block (``r1_zero``: `` <think>``,
            ``chat``: ``<think>\\n`` unless the chat template already opens it), which
            makes the format reward easier to earn early in training. Not meaningful for
            ``none``, which is rejected rather than silently ignored.
    """
    check_template(name, tokenizer)
    if name == "r1_zero":
        prefix, suffix = R1_ZERO_TEMPLATE.split("{prompt}")
        text = prefix + prompt + suffix  # not str.format: prompts contain braces (LaTeX)
        return text + " <think>" if open_think else text
    if name == "chat":
        text = _chat_backend(tokenizer).apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        if open_think and not text.rstrip().endswith("<think>"):
            text += "<think>\n"
        return text
    if open_think:
        raise ValueError("open_think is not supported with template 'none' (the prompt is "
                         "used as is)")
    return prompt
