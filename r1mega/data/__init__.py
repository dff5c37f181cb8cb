"""Prompt data, templates and tokenizers: everything between a file on disk and the
token ids a rollout starts from. Nothing here imports torch, so it loads fast and can
be used (and tested) without a GPU stack."""

from r1mega.data.prompts import (
    EmptyDatasetError,
    PromptDataset,
    PromptExample,
    PromptSampler,
    SkippedRow,
    epoch_permutation,
    get_field,
    load_prompt_dataset,
)
from r1mega.data.templates import (
    R1_ZERO_TEMPLATE,
    TEMPLATE_NAMES,
    apply_template,
    check_template,
)
from r1mega.data.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    build_tokenizer,
)

__all__ = [
    "R1_ZERO_TEMPLATE",
    "TEMPLATE_NAMES",
    "ByteTokenizer",
    "EmptyDatasetError",
    "HFTokenizer",
    "PromptDataset",
    "PromptExample",
    "PromptSampler",
    "SentencePieceTokenizer",
    "SkippedRow",
    "Tokenizer",
    "apply_template",
    "build_tokenizer",
    "check_template",
    "epoch_permutation",
    "get_field",
    "load_prompt_dataset",
]
