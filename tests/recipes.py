"""The shipped GPU recipes scaled down to CPU size, for tests that run them for real.

A recipe (``configs/r1_zero_671b.yaml``, ``configs/qwen2_5_7b.yaml``) is loaded as it is
and only its *sizes* are overridden: layers, widths, heads, experts, vocabulary, lengths,
batch (the number of minibatches a rollout is split into is one of them: it sets the rows
per update; several stay several), run length and the layouts' sizes (:data:`SIZE_KEYS`),
plus the inputs the recipe leaves to the user (tokenizer, dataset, checkpoint directory:
:data:`INPUT_KEYS`). Every algorithmic choice stays: R1's clip 10,
``seq-mean-token-mean``, k3, minibatches, the reference reset, the length schedule, MTP,
expert-bias routing, sequence parallelism, the distributed optimizer, full recompute,
checkpointing.

The one exception is precision (:data:`PRECISION_EXCEPTION`): FP8 GEMMs and bf16 Adam
moments need Transformer Engine on a GPU (FP8 tensor cores; TE's FusedAdam inside
megatron's precision-aware optimizer), which CPU CI cannot install. They are overridden to
``fp8=null`` and float32 moments, and :func:`check_scaling` asserts that nothing else
outside the sizes changed.
"""

from __future__ import annotations

import json
from pathlib import Path

from r1mega.data.templates import R1_ZERO_TEMPLATE

#: Keys a scaled recipe may change: sizes only.
SIZE_KEYS = frozenset({
    "model.num_layers", "model.first_k_dense_layers", "model.hidden_size",
    "model.ffn_hidden_size", "model.num_attention_heads", "model.num_query_groups",
    "model.q_lora_rank", "model.kv_lora_rank", "model.qk_head_dim",
    "model.qk_pos_emb_head_dim", "model.v_head_dim", "model.num_experts", "model.moe_topk",
    "model.moe_ffn_hidden_size", "model.moe_shared_expert_intermediate_size",
    "model.vocab_size",
    "train.steps", "train.seq_length",
    "rollout.prompts_per_step", "rollout.max_new_tokens", "rollout.length_schedule",
    "rollout.max_batch_size", "grpo.group_size", "grpo.minibatches",
    "grpo.reference_reset_interval",
    "checkpoint.save_interval",
    "train_layout.tp", "train_layout.pp", "train_layout.pp_layers", "train_layout.ep",
    "generation_layout.tp", "generation_layout.ep", "launch.nproc_per_node",
})
#: What the recipe leaves to its user (null in the file) and where a test writes.
INPUT_KEYS = frozenset({"tokenizer.path", "data.train_path", "checkpoint.save_dir",
                        "logging.wandb_dir"})
#: CPU CI cannot run FP8 or TE's FusedAdam (bf16 moments): the single non-size exception.
PRECISION_EXCEPTION = ("precision.fp8=null", "precision.exp_avg_dtype=float32",
                       "precision.exp_avg_sq_dtype=float32")

R1_ZERO_671B_SCALED = [
    # DeepSeek-V3 shape, tiny: MLA, 1 dense + 2 MoE layers, 8 experts top-2 in the
    # recipe's 8 groups (4 reachable), shared expert, MTP.
    "model.num_layers=3", "model.first_k_dense_layers=1", "model.hidden_size=64",
    "model.ffn_hidden_size=128", "model.num_attention_heads=4", "model.q_lora_rank=32",
    "model.kv_lora_rank=16", "model.qk_head_dim=16", "model.qk_pos_emb_head_dim=8",
    "model.v_head_dim=16", "model.num_experts=8", "model.moe_topk=2",
    "model.moe_ffn_hidden_size=32", "model.moe_shared_expert_intermediate_size=32",
    "model.vocab_size=640",
    # 4 ranks: TP 2 with SP x PP 2 (uneven: the MTP block sits on the lighter last stage)
    # x EP 2 for training; TP 2 x EP 4 for generation.
    "train_layout.tp=2", "train_layout.pp=2", "train_layout.pp_layers=[2,1]",
    "train_layout.ep=2", "generation_layout.tp=2", "generation_layout.ep=4",
    "launch.nproc_per_node=4",
    # 8 questions x 2 outputs per rollout in 4 minibatches of 2 groups (the recipe: 512 x
    # 16 in 16 minibatches of 32 groups): several updates per rollout, on whole groups.
    "rollout.prompts_per_step=8", "grpo.group_size=2", "grpo.minibatches=4",
    "rollout.max_batch_size=16",
    # Lengths: 8 new tokens, 16 from step 3 on (the recipe: 32,768, then 65,536), after
    # a prompt budget of 24 (the template is ~6 tokens of the test's tokenizer).
    "train.seq_length=32", "rollout.max_new_tokens=8",
    "rollout.length_schedule=[{from_step: 3, max_new_tokens: 16}]",
    # The reference reset after step 3 (the recipe: 25), a checkpoint every step.
    "grpo.reference_reset_interval=3", "checkpoint.save_interval=1",
    *PRECISION_EXCEPTION,
]

QWEN2_5_7B_SCALED = [
    # Qwen2 shape, tiny: GQA (8 query heads, 4 key/value heads), q/k/v biases.
    "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
    "model.num_attention_heads=8", "model.num_query_groups=4", "model.vocab_size=640",
    # 2 ranks: TP 2 (the recipe: 4) for training and generation.
    "train_layout.tp=2", "generation_layout.tp=2", "launch.nproc_per_node=2",
    "rollout.prompts_per_step=4", "grpo.group_size=2",
    "train.seq_length=32", "rollout.max_new_tokens=8", "checkpoint.save_interval=1",
]


def overridden_keys(overrides: list[str]) -> set[str]:
    return {o.split("=", 1)[0] for o in overrides}


def check_scaling(overrides: list[str]) -> None:
    """Only sizes, inputs and the stated precision exception may be overridden; several
    minibatches per rollout stay several."""
    minibatches = [o for o in overrides if o.startswith("grpo.minibatches=")]
    assert all(int(o.split("=")[1]) > 1 for o in minibatches), minibatches
    others = overridden_keys(overrides) - SIZE_KEYS - INPUT_KEYS
    exception = overridden_keys(list(PRECISION_EXCEPTION))
    assert others <= exception, f"not a size: {sorted(others - exception)}"
    for o in overrides:
        if o.split("=", 1)[0] in exception:
            assert o in PRECISION_EXCEPTION, o


PROBLEMS = [("What is 2 + 3?", "5"), ("Compute 7 * 6.", "42"), ("What is 10 - 4?", "6"),
            ("Evaluate 9 + 9.", "18"), ("What is 12 / 3?", "4"), ("Compute 5 * 5.", "25"),
            ("What is 8 - 2?", "6"), ("Evaluate 3 * 4.", "12")]


def write_inputs(directory: Path) -> tuple[Path, Path]:
    """A tiny byte-level BPE tokenizer (Hugging Face files, as the recipes expect) and a
    JSONL prompt set in the recipes' fields; returns (tokenizer dir, dataset path)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory.mkdir(parents=True, exist_ok=True)
    tok_dir = directory / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [R1_ZERO_TEMPLATE.format(prompt=q) + f" <think> {a} </think> <answer> {a} "
              "</answer>" for q, a in PROBLEMS] * 20
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
        "eos_token": "</s>", "pad_token": "<pad>"}))
    data = directory / "prompts.jsonl"
    data.write_text("".join(json.dumps({"problem": q, "answer": a}) + "\n"
                            for q, a in PROBLEMS * 4))
    return tok_dir, data
