"""Typed configuration schema for every r1mega job.

Each section is a dataclass; :func:`r1mega.config.load_config` merges YAML files
and ``key=value`` overrides onto these through omegaconf, which rejects unknown
keys (suggesting the closest valid name) and wrong types before anything runs.
Cross-field checks (layouts against the model and the world size) live in
:mod:`r1mega.config.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


@dataclass
class ModelConfig:
    """Architecture of the policy: a dense Llama/Qwen2-style GPT or DeepSeek-V3.

    Field names follow the Hugging Face configs where one exists so converted
    checkpoints map one-to-one.
    """

    arch: str = MISSING  # llama | qwen2 | deepseek_v3
    num_layers: int = MISSING
    hidden_size: int = MISSING
    ffn_hidden_size: int = MISSING  # dense MLP intermediate size
    num_attention_heads: int = MISSING
    num_query_groups: int | None = None  # GQA key/value heads; None = MHA
    kv_channels: int | None = None  # head dim; None = hidden / heads
    vocab_size: int = MISSING
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    norm_epsilon: float = 1e-6
    qkv_bias: bool = False  # Qwen2 has q/k/v biases
    tie_embeddings: bool = False
    init_method_std: float = 0.02
    # Multi-head latent attention (DeepSeek-V3). q_lora_rank None = no q compression.
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_head_dim: int = 128  # no-position part of q/k
    qk_pos_emb_head_dim: int = 64  # rotary part of q/k
    v_head_dim: int = 128
    # YaRN rope scaling (DeepSeek-V3); rope_type rope = plain RoPE.
    rope_type: str = "rope"  # rope | yarn
    rope_scaling_factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    # Mixture of experts. num_experts None = dense model.
    num_experts: int | None = None
    moe_ffn_hidden_size: int | None = None
    moe_topk: int = 8
    moe_shared_expert_intermediate_size: int | None = None
    first_k_dense_layers: int = 0
    moe_router_score_function: str = "sigmoid"  # sigmoid | softmax
    moe_router_enable_expert_bias: bool = True  # aux-loss-free balancing
    moe_router_bias_update_rate: float = 1e-3
    moe_router_topk_scaling_factor: float | None = None  # routed_scaling_factor
    moe_router_num_groups: int | None = None  # n_group
    moe_router_group_topk: int | None = None  # topk_group
    moe_aux_loss_coeff: float = 0.0  # sequence-wise balance loss (DeepSeek-V3: 1e-4)
    # Multi-token prediction.
    mtp_num_layers: int = 0
    mtp_loss_scaling_factor: float = 0.1
    # Which megatron-core layer implementation: auto picks TE when it imports.
    transformer_impl: str = "auto"  # auto | transformer_engine | local
    # lm: the policy (next-token head); scalar: a reward model (one score per sequence,
    # HF *ForSequenceClassification with one label; see r1mega.models.reward_model).
    head: str = "lm"


@dataclass
class LayoutConfig:
    """A parallel layout. DP is what remains: world / (tp * pp * cp)."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1  # expert tensor parallelism
    cp: int = 1
    sequence_parallel: bool = False
    # Explicit uneven pipeline split: layers per stage (sums to num_layers). Only the
    # first and last stage may differ from the middle ones (megatron-core's rule).
    pp_layers: list[int] | None = None


@dataclass
class PrecisionConfig:
    """Numeric formats (see r1mega.models.precision). fp8 needs Transformer Engine and an
    FP8-capable GPU (r1mega.models.fp8_support says which recipe needs what)."""

    params_dtype: str = "bfloat16"  # model weights/activations: float32 | bfloat16
    # FP8 GEMMs in training: None | hybrid (E4M3 forward, E5M2 gradients) | e4m3 (all E4M3)
    fp8: str | None = None
    # delayed | tensorwise (per-tensor current scaling) | blockwise (DeepSeek-V3's 1x128
    # activation / 128x128 weight blocks) | mxfp8 (Blackwell)
    fp8_recipe: str = "blockwise"
    fp8_amax_history_len: int = 1024  # delayed scaling only
    fp8_amax_compute_algo: str = "max"  # delayed scaling only: max | most_recent
    # Optimizer tensors: float32 | bfloat16. Anything narrower than float32 uses
    # megatron's precision-aware optimizer (TE FusedAdam, distributed optimizer).
    main_params_dtype: str = "float32"  # master weights
    exp_avg_dtype: str = "float32"  # Adam first moment (DeepSeek-V3: bfloat16)
    exp_avg_sq_dtype: str = "float32"  # Adam second moment (DeepSeek-V3: bfloat16)


@dataclass
class TrainConfig:
    """Optimisation of the policy."""

    # RL: steps (rollouts), each with grpo.minibatches x grpo.epochs_per_step optimizer
    # updates; the LR schedule (lr_warmup_steps and the decay) counts optimizer updates.
    steps: int = 1
    seed: int = 1234
    micro_batch_size: int = 1
    global_batch_size: int = 1  # sequences per optimizer step, across DP
    seq_length: int = 128
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_warmup_steps: int = 0
    lr_decay_style: str = "constant"  # constant | linear | cosine
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    use_distributed_optimizer: bool = True
    recompute: str | None = None  # None | selective | full
    # Padding-free (THD-packed) microbatches for the RL passes: rows of different lengths
    # are concatenated instead of padded to the longest.
    pack_sequences: bool = True


@dataclass
class GRPOConfig:
    """Group Relative Policy Optimization and its variants."""

    group_size: int = 16  # samples per prompt (G)
    advantage: str = "grpo"  # grpo | dr_grpo
    normalize_std: bool = True
    clip_low: float = 0.2
    clip_high: float = 0.2  # > clip_low: DAPO clip-higher
    dual_clip: float | None = None
    ratio_level: str = "token"  # token | sequence (GSPO)
    loss_agg: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
    kl_coef: float = 0.001
    kl_estimator: str = "k3"  # k1 | k2 | k3
    kl_in_reward: bool = False
    drop_uniform_groups: bool = False  # DAPO dynamic sampling
    tis_cap: float | None = None  # truncated importance sampling cap
    epochs_per_step: int = 1
    # --- R1's update schedule (see r1mega.training.grpo_step) ---
    # Optimizer updates per epoch over one rollout: the rollout's prompt groups are split
    # into this many minibatches of whole groups (DeepSeek-R1: 8,192 outputs per rollout
    # in 16 minibatches of 512); old log-probs come from before the first update.
    minibatches: int = 1
    # Replace the reference policy by the current policy after every N steps (rollouts);
    # 0 never does. The reference is part of the checkpoint.
    reference_reset_interval: int = 0


@dataclass
class LengthPhase:
    """One phase of the response-length schedule (r1mega.training.length_schedule)."""

    from_step: int = MISSING  # first step of the phase (phase 0 is step 1's settings)
    max_new_tokens: int = MISSING  # the phase's response budget


@dataclass
class RolloutConfig:
    """Sampling from the policy, and the engine that does it."""

    prompts_per_step: int = 1
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=lambda: ["</answer>"])
    # colocated: the rollout engine (megatron-core's dynamic inference engine) on the
    # generation layout, weights resharded each step; simple: the training-layout
    # sampler without KV cache (a reference, quadratic in length).
    engine: str = "colocated"  # colocated | simple
    # --- the engine (r1mega.rollout.engine) ---
    max_batch_size: int = 64  # requests decoded together per generation DP replica
    # Tokens per forward pass (rounded up to a multiple of 64); longer prefills are
    # chunked.
    max_tokens_per_step: int = 2048
    kv_block_tokens: int | None = None  # paged-KV block size; None: 64 (MLA), 256 (dense)
    # KV buffer per rank in GiB; None: room for max_batch_size full-length sequences.
    kv_cache_gib: float | None = None
    prefix_caching: bool = True  # a GRPO group's samples share their prompt's KV blocks
    chunked_prefill: bool = True
    # GPU only: capture the decode steps in CUDA graphs (megatron's local implementation;
    # checked by bench/gpu_check_rollout.py, off until that passes on your cluster).
    cuda_graphs: bool = False
    # MoE: record the experts each token used during the rollout and replay them in the
    # training forward (rollout and trainer then route identically).
    routing_replay: bool = False
    # Rollout-vs-trainer log-prob parity, measured every step (rollout/logprob_diff_*):
    # tokens whose |rollout - train| log-prob exceeds the threshold are counted; with a
    # bound, a step whose mean gap exceeds it stops the run.
    logprob_outlier_threshold: float = 0.1
    logprob_check: float | None = None
    refit_backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    offload_training_state: bool = True  # gradients and optimizer state off the GPU
    release_generation_weights: bool = True  # generation weights freed while training
    # Response-length schedule: from step `from_step` on, responses get `max_new_tokens`
    # and train.seq_length grows by the same amount (the prompt budget is kept).
    # DeepSeek-R1-Zero: 32,768 tokens, then 65,536 from step ~8.2k.
    length_schedule: list[LengthPhase] = field(default_factory=list)


@dataclass
class DataSourceConfig:
    """One prompt source of a mixed RL stage (DeepSeek-R1's second RL stage): reasoning
    prompts scored by the rule rewards, general prompts scored by a reward model."""

    name: str = MISSING  # used in metric names: reward/<name>/mean
    path: str = MISSING  # JSONL/Parquet file or builtin:<task>
    weight: float = 1.0  # share of each step's prompts
    reward: str = "rules"  # rules | reward_model
    prompt_field: str | None = None  # default: data.prompt_field
    answer_field: str | None = None  # default: data.answer_field (unused for reward_model)


@dataclass
class ReadabilityConfig:
    """What a readable reasoning response must satisfy (see r1mega.data.readability)."""

    require_think: bool = True  # exactly one closed <think>...</think> block
    require_summary: bool = True  # non-empty text after the reasoning
    language: str | None = "en"  # en | zh | null (no language check)
    min_language_fraction: float = 0.95  # of the response's words
    max_response_tokens: int | None = None


@dataclass
class SFTConfig:
    """Supervised fine-tuning: cold start, the large SFT stage, distillation."""

    train_path: str | None = None  # JSONL/Parquet rows with a prompt and a response
    prompt_field: str = "prompt"
    response_field: str = "response"
    epochs: int = 1
    pack_sequences: bool = True  # several rows per train.seq_length sequence
    filter_readability: bool = False  # cold-start data: drop (and count) unreadable rows
    readability: ReadabilityConfig = field(default_factory=ReadabilityConfig)


@dataclass
class SampleConfig:
    """Rejection sampling: k responses per prompt, keep the accepted, readable, unique."""

    prompts_path: str | None = None  # default: data.train_path
    max_prompts: int | None = None  # per source (built-in tasks hold 4096 prompts)
    output_dir: str | None = None  # dataset.jsonl, stats.json (resumable)
    samples_per_prompt: int = 4
    prompts_per_batch: int = 8
    min_reward: float = 1.0  # rule-scored prompts: keep samples whose reward >= this
    reward_model_threshold: float = 0.0  # general prompts: keep RM score >= this
    max_kept_per_prompt: int | None = None
    dedupe: bool = True
    readability: ReadabilityConfig = field(default_factory=ReadabilityConfig)


@dataclass
class RewardModelConfig:
    """A reward model: the policy's architecture family with a scalar head, loaded from a
    Hugging Face *ForSequenceClassification directory with one label (converted once into
    the job's HF cache) or its conversion (its model config travels in the directory)."""

    load: str | None = None
    scale: float = 1.0  # score multiplier before it enters the GRPO reward


@dataclass
class RewardSpec:
    """One reward plug-in and its weight in the sum."""

    name: str = MISSING  # accuracy | format | language | code
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class RewardsConfig:
    specs: list[RewardSpec] = field(default_factory=list)
    timeout_s: float = 5.0
    workers: int = 2
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)


@dataclass
class DataConfig:
    """Prompt datasets (JSONL or Parquet)."""

    train_path: str | None = None
    eval_path: str | None = None
    prompt_field: str = "problem"
    answer_field: str = "answer"
    template: str = "r1_zero"  # r1_zero | chat | none
    shuffle: bool = True
    # Mixed sources (stage-2 RL); when set, train_path is not used for training prompts.
    sources: list[DataSourceConfig] = field(default_factory=list)


@dataclass
class TokenizerConfig:
    """Tokenizer: a Hugging Face tokenizer directory or a sentencepiece model."""

    type: str = "hf"  # hf | sentencepiece | bytes
    path: str | None = None


@dataclass
class CheckpointConfig:
    # Initial weights: a run's save_dir, one of its steps, a converted checkpoint, a
    # Hugging Face model directory (model and tokenizer then come from it) or
    # warm_start:DIR (see r1mega.checkpointing.paths).
    load: str | None = None
    # Where Hugging Face directories are converted (null: <save_dir>/hf_cache, else
    # $R1MEGA_CACHE_DIR or ~/.cache/r1mega/hf); share one between runs to convert once.
    hf_cache_dir: str | None = None
    save_dir: str | None = None
    save_interval: int = 0  # steps; 0 = only at the end
    keep_last: int = 2


@dataclass
class LoggingConfig:
    log_interval: int = 1
    wandb_mode: str = "offline"  # online | offline | disabled
    wandb_project: str = "r1mega"
    wandb_run_name: str | None = None
    wandb_dir: str | None = None
    sample_table_interval: int = 10


@dataclass
class EvalConfig:
    """Held-out evaluation during RL training (:mod:`r1mega.held_out_eval`): the curves
    of the R1 paper.

    With ``interval`` > 0: before the first step, every ``interval`` steps and after the
    last one, ``k`` responses per held-out problem are sampled with the job's own rollout
    engine at the R1 protocol (temperature 0.6, top-p 0.95) and scored with the accuracy
    reward; pass@1 is the fraction correct averaged over the k samples and the problems.
    Logged to W&B as ``eval/*`` (with an ``eval/samples`` table of ``table_rows``
    responses) and printed as an ``eval step ...`` line.
    """

    interval: int = 0  # steps between evaluations; 0 = no evaluation during training
    path: str | None = None  # JSONL/Parquet file or builtin:<task>; default data.eval_path
    k: int = 16  # samples per problem
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int | None = None  # default rollout.max_new_tokens
    limit: int | None = None  # the first N problems; None = all
    table_rows: int = 16  # responses per evaluation in the W&B table (one per problem first)


@dataclass
class SlurmConfig:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gib: float = 80.0
    partition: str | None = None
    account: str | None = None
    time: str = "04:00:00"
    container_image: str | None = None


@dataclass
class LaunchConfig:
    """How `r1mega train` starts processes when not already under torchrun/srun."""

    nproc_per_node: int = 1
    master_port: int = 29500


@dataclass
class R1MegaConfig:
    """The whole job."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train_layout: LayoutConfig = field(default_factory=LayoutConfig)
    generation_layout: LayoutConfig = field(default_factory=LayoutConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
