"""Cross-field checks of a merged r1mega config.

omegaconf already rejects unknown keys and wrong types field by field; what it cannot see
are relations between fields: a tensor-parallel size that does not divide the head count,
a pipeline split that does not add up to the layer count, a layout that does not tile the
world size. Megatron-core would eventually fail on these too, but only after process
groups are up and often with an assertion that names neither the config key nor the
value, so every check here reports the full dotted key and the numbers involved.

All problems are collected and raised together as one :class:`ConfigError`, so a user
fixing a YAML file sees every mistake in one run rather than one per launch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "ConfigError",
    "data_parallel_size",
    "expert_data_parallel_size",
    "validate_config",
]

ARCHS = ("llama", "qwen2", "deepseek_v3")
TRANSFORMER_IMPLS = ("auto", "transformer_engine", "local")
MODEL_HEADS = ("lm", "scalar")
ROPE_TYPES = ("rope", "yarn")
ROUTER_SCORE_FUNCTIONS = ("sigmoid", "softmax")
PARAMS_DTYPES = ("float32", "bfloat16")
FP8_MODES = (None, "hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
FP8_AMAX_ALGOS = ("max", "most_recent")
OPTIMIZER_DTYPES = ("float32", "bfloat16")
LR_DECAY_STYLES = ("constant", "linear", "cosine")
RECOMPUTE_MODES = (None, "selective", "full")
WANDB_MODES = ("online", "offline", "disabled")
TOKENIZER_TYPES = ("hf", "sentencepiece", "bytes")
TEMPLATES = ("r1_zero", "chat", "none")
LAYOUT_NAMES = ("train_layout", "generation_layout")
ROLLOUT_ENGINES = ("colocated", "simple")
REFIT_BACKENDS = ("auto", "nccl", "gloo")


class ConfigError(ValueError):
    """A config that cannot run, with every problem named by its full dotted key.

    A ``ValueError`` subclass so callers that only know "bad value" still catch it.
    ``errors`` holds the individual problems (one string each) for programs that want
    to show or test them separately; ``str(err)`` joins them for humans.
    """

    def __init__(self, message: str, errors: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.errors: list[str] = list(errors) if errors else [message]


def _fmt(value: Any) -> str:
    """Render a value the way the user would write it in YAML (null/true, not None/True)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return str(value)


def _one_of(errors: list[str], key: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        choices = ", ".join(_fmt(a) for a in allowed)
        errors.append(f"{key}={_fmt(value)} is not one of: {choices}")


def _at_least(errors: list[str], key: str, value: Any, low: float, why: str = "") -> bool:
    """Record an error unless value >= low; returns whether the value is usable."""
    if value is None or value < low:
        errors.append(f"{key}={_fmt(value)} must be >= {_fmt(low)}{why}")
        return False
    return True


def _layout_sizes(layout: Any) -> tuple[int, int, int, int, int]:
    return (layout.tp, layout.pp, layout.ep, layout.etp, layout.cp)


def data_parallel_size(layout: Any, world_size: int, name: str = "layout") -> int:
    """Data-parallel size of ``layout`` on ``world_size`` ranks: world / (tp * pp * cp).

    Raises :class:`ConfigError` (naming ``name``, e.g. ``train_layout``) when the layout
    does not tile the world, because a fractional DP size would otherwise surface as a
    hang or an opaque assertion inside megatron's ``initialize_model_parallel``.
    """
    tp, pp, _, _, cp = _layout_sizes(layout)
    model_parallel = tp * pp * cp
    if world_size < 1 or model_parallel < 1 or world_size % model_parallel:
        raise ConfigError(
            f"{name}: world size {world_size} is not divisible by "
            f"tp*pp*cp = {tp}*{pp}*{cp} = {model_parallel}"
        )
    return world_size // model_parallel


def expert_data_parallel_size(layout: Any, world_size: int, name: str = "layout") -> int:
    """Expert data-parallel size: world / (etp * ep * pp).

    Megatron-core re-tiles the tp*cp*dp ranks of every pipeline stage as etp x ep x
    expert-dp for the MoE layers, so this must be integral as well.
    """
    _, pp, ep, etp, _ = _layout_sizes(layout)
    expert_parallel = etp * ep * pp
    if world_size < 1 or expert_parallel < 1 or world_size % expert_parallel:
        raise ConfigError(
            f"{name}: world size {world_size} is not divisible by etp*ep*pp = "
            f"{etp}*{ep}*{pp} = {expert_parallel} (megatron lays the expert layers out as "
            f"etp x ep x expert-data-parallel inside each pipeline stage)"
        )
    return world_size // expert_parallel


def suggest_pp_layers(num_layers: int, pp: int) -> list[int] | None:
    """A valid uneven split of ``num_layers`` over ``pp`` stages, or None.

    Middle stages hold equal counts and the first/last stages take the remainder (at most
    as many as a middle stage, since they also carry the embedding, the output head and
    any MTP block). Used only to make the "does not divide" error actionable.
    """
    if pp < 2 or num_layers < pp:
        return None
    if pp == 2:
        return [num_layers - num_layers // 2, num_layers // 2]
    for middle in range(-(-num_layers // pp), 0, -1):
        rest = num_layers - (pp - 2) * middle
        if 2 <= rest <= 2 * middle:
            first = -(-rest // 2)
            return [first] + [middle] * (pp - 2) + [rest - first]
    return None


def _check_pp_split(errors: list[str], p: str, layout: Any, num_layers: int) -> None:
    pp = layout.pp
    pp_layers = None if layout.pp_layers is None else [int(n) for n in layout.pp_layers]
    if pp_layers is None:
        if num_layers % pp:
            hint = suggest_pp_layers(num_layers, pp)
            example = f", e.g. {p}.pp_layers={hint}" if hint else ""
            errors.append(
                f"{p}.pp={pp} does not divide model.num_layers={num_layers}; set "
                f"{p}.pp_layers to an uneven split (first and last stage may differ from "
                f"the middle ones){example}"
            )
        return
    if pp == 1:
        if pp_layers != [num_layers]:
            errors.append(f"{p}.pp_layers={pp_layers} with {p}.pp=1 must be null or [{num_layers}]")
        return
    if len(pp_layers) != pp:
        errors.append(f"{p}.pp_layers={pp_layers} has {len(pp_layers)} entries but {p}.pp={pp}")
        return
    bad = [i for i, n in enumerate(pp_layers) if n < 1]
    for i in bad:
        errors.append(f"{p}.pp_layers[{i}]={pp_layers[i]} must be >= 1 (every stage needs a layer)")
    if sum(pp_layers) != num_layers:
        errors.append(
            f"{p}.pp_layers={pp_layers} sums to {sum(pp_layers)} but model.num_layers={num_layers}"
        )
    middle = pp_layers[1:-1]
    if len(set(middle)) > 1:
        errors.append(
            f"{p}.pp_layers={pp_layers}: the middle stages must hold the same number of "
            f"layers (megatron-core lets only the first and last stage differ)"
        )


def _check_layout(errors: list[str], p: str, layout: Any, cfg: Any, world_size: int | None) -> bool:
    """Check one parallel layout; returns whether its sizes are usable for DP math."""
    model = cfg.model
    sizes_ok = True
    for field_name in ("tp", "pp", "ep", "etp", "cp"):
        sizes_ok &= _at_least(errors, f"{p}.{field_name}", getattr(layout, field_name), 1)
    if not sizes_ok:
        return False
    tp, _, ep, etp, cp = _layout_sizes(layout)

    def divides(size_key: str, size: int, target_key: str, target: int | None) -> None:
        if target is not None and target >= 1 and target % size:
            errors.append(f"{p}.{size_key}={size} does not divide {target_key}={target}")

    divides("tp", tp, "model.num_attention_heads", model.num_attention_heads)
    divides("tp", tp, "model.num_query_groups", model.num_query_groups)
    divides("tp", tp, "model.ffn_hidden_size", model.ffn_hidden_size)

    if model.num_experts is None:
        for key, size in (("ep", ep), ("etp", etp)):
            if size > 1:
                errors.append(
                    f"{p}.{key}={size} but the model is dense (model.num_experts is null); "
                    f"expert parallelism needs an MoE model"
                )
    else:
        divides("ep", ep, "model.num_experts", model.num_experts)
        divides("etp", etp, "model.moe_ffn_hidden_size", model.moe_ffn_hidden_size)
        # The shared expert is an ordinary tensor-parallel MLP, split by tp, not etp.
        divides(
            "tp",
            tp,
            "model.moe_shared_expert_intermediate_size",
            model.moe_shared_expert_intermediate_size,
        )

    if model.num_layers is not None and model.num_layers >= 1:
        _check_pp_split(errors, p, layout, model.num_layers)

    if p == "train_layout" and model.num_experts is not None and tp > 1 \
            and not layout.sequence_parallel:
        errors.append(
            f"{p}.tp={tp} on an MoE model requires {p}.sequence_parallel=true "
            f"(megatron-core refuses to train MoE with tensor but not sequence parallelism)"
        )
    if layout.sequence_parallel and tp == 1:
        errors.append(f"{p}.sequence_parallel=true requires {p}.tp > 1 (it splits along tp)")

    seq_length = cfg.train.seq_length
    if cp > 1 and seq_length % (2 * cp):
        errors.append(
            f"{p}.cp={cp} requires train.seq_length={seq_length} to be divisible by "
            f"2*cp={2 * cp} (context parallelism gives each rank two load-balanced chunks)"
        )

    if world_size is not None:
        for counter in (data_parallel_size, expert_data_parallel_size):
            try:
                counter(layout, world_size, name=p)
            except ConfigError as err:
                errors.extend(err.errors)
                sizes_ok = False
    return sizes_ok


def _check_model(errors: list[str], model: Any) -> None:
    _one_of(errors, "model.arch", model.arch, ARCHS)
    _one_of(errors, "model.transformer_impl", model.transformer_impl, TRANSFORMER_IMPLS)
    _one_of(errors, "model.head", model.head, MODEL_HEADS)
    if model.head == "scalar" and model.arch == "deepseek_v3":
        errors.append("model.head=scalar (a reward model) is supported for the dense "
                      "architectures (llama, qwen2), not deepseek_v3")
    _one_of(errors, "model.rope_type", model.rope_type, ROPE_TYPES)
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads"):
        _at_least(errors, f"model.{key}", getattr(model, key), 1)
    _at_least(errors, "model.vocab_size", model.vocab_size, 1)
    _at_least(errors, "model.max_position_embeddings", model.max_position_embeddings, 1)
    if model.kv_channels is not None:
        _at_least(errors, "model.kv_channels", model.kv_channels, 1)

    heads = model.num_attention_heads
    groups = model.num_query_groups
    groups_ok = groups is not None and _at_least(errors, "model.num_query_groups", groups, 1)
    if groups_ok and heads >= 1 and heads % groups:
        errors.append(
            f"model.num_query_groups={groups} does not divide model.num_attention_heads={heads}"
        )

    _at_least(errors, "model.mtp_num_layers", model.mtp_num_layers, 0)
    dense_ok = _at_least(errors, "model.first_k_dense_layers", model.first_k_dense_layers, 0)
    if dense_ok and model.first_k_dense_layers > model.num_layers:
        errors.append(
            f"model.first_k_dense_layers={model.first_k_dense_layers} exceeds "
            f"model.num_layers={model.num_layers}"
        )

    experts = model.num_experts
    if model.arch == "deepseek_v3":
        if experts is None:
            errors.append("model.num_experts must be set for model.arch=deepseek_v3 (MoE)")
        if model.moe_ffn_hidden_size is None:
            errors.append("model.moe_ffn_hidden_size must be set for model.arch=deepseek_v3")
    if experts is None:
        return
    if not _at_least(errors, "model.num_experts", experts, 1):
        return
    _one_of(
        errors,
        "model.moe_router_score_function",
        model.moe_router_score_function,
        ROUTER_SCORE_FUNCTIONS,
    )
    if model.moe_ffn_hidden_size is None:
        if model.arch != "deepseek_v3":
            errors.append("model.moe_ffn_hidden_size must be set when model.num_experts is set")
    else:
        _at_least(errors, "model.moe_ffn_hidden_size", model.moe_ffn_hidden_size, 1)
    if model.moe_shared_expert_intermediate_size is not None:
        _at_least(
            errors,
            "model.moe_shared_expert_intermediate_size",
            model.moe_shared_expert_intermediate_size,
            1,
        )
    topk = model.moe_topk
    if _at_least(errors, "model.moe_topk", topk, 1) and topk > experts:
        errors.append(f"model.moe_topk={topk} exceeds model.num_experts={experts}")

    groups_n = model.moe_router_num_groups
    group_topk = model.moe_router_group_topk
    if group_topk is not None and groups_n is None:
        errors.append(
            f"model.moe_router_group_topk={group_topk} needs model.moe_router_num_groups "
            f"(group-limited routing)"
        )
    if groups_n is not None and _at_least(errors, "model.moe_router_num_groups", groups_n, 1):
        if experts % groups_n:
            errors.append(
                f"model.moe_router_num_groups={groups_n} does not divide "
                f"model.num_experts={experts}"
            )
        elif group_topk is not None and _at_least(
            errors, "model.moe_router_group_topk", group_topk, 1
        ):
            if group_topk > groups_n:
                errors.append(
                    f"model.moe_router_group_topk={group_topk} exceeds "
                    f"model.moe_router_num_groups={groups_n}"
                )
            elif topk >= 1 and topk > group_topk * (experts // groups_n):
                errors.append(
                    f"model.moe_topk={topk} exceeds the experts reachable through "
                    f"model.moe_router_group_topk={group_topk} groups of "
                    f"{experts // groups_n}"
                )


def _check_precision(errors: list[str], cfg: Any) -> None:
    """Formats and their combinations; whether this machine can run FP8 is decided when
    the model is built (r1mega.models.fp8_support), since configs are often checked on a
    login node without GPUs."""
    precision = cfg.precision
    _one_of(errors, "precision.params_dtype", precision.params_dtype, PARAMS_DTYPES)
    _one_of(errors, "precision.fp8", precision.fp8, FP8_MODES)
    _one_of(errors, "precision.fp8_recipe", precision.fp8_recipe, FP8_RECIPES)
    _one_of(errors, "precision.fp8_amax_compute_algo", precision.fp8_amax_compute_algo,
            FP8_AMAX_ALGOS)
    _at_least(errors, "precision.fp8_amax_history_len", precision.fp8_amax_history_len, 1)
    if precision.fp8 and cfg.model.transformer_impl == "local":
        errors.append(
            f"precision.fp8={precision.fp8} needs Transformer Engine layers but "
            "model.transformer_impl=local builds megatron-core's local ones (use auto or "
            "transformer_engine, or precision.fp8=null)"
        )
    narrow = []
    for key in ("main_params_dtype", "exp_avg_dtype", "exp_avg_sq_dtype"):
        value = getattr(precision, key)
        _one_of(errors, f"precision.{key}", value, OPTIMIZER_DTYPES)
        if value != "float32":
            narrow.append(f"precision.{key}={value}")
    if narrow and not cfg.train.use_distributed_optimizer:
        errors.append(
            f"{', '.join(narrow)} needs train.use_distributed_optimizer=true (megatron-core's "
            "precision-aware optimizer only runs inside the distributed optimizer)"
        )
    if precision.main_params_dtype == "bfloat16" and precision.params_dtype == "float32":
        errors.append(
            "precision.main_params_dtype=bfloat16 with precision.params_dtype=float32: the "
            "optimizer's master weights cannot be narrower than the model's weights"
        )


def _check_training(errors: list[str], cfg: Any, train_dp: int | None) -> None:
    train = cfg.train
    _check_precision(errors, cfg)

    _one_of(errors, "train.lr_decay_style", train.lr_decay_style, LR_DECAY_STYLES)
    _one_of(errors, "train.recompute", train.recompute, RECOMPUTE_MODES)
    _at_least(errors, "train.steps", train.steps, 1)
    _at_least(errors, "train.seq_length", train.seq_length, 1)
    _at_least(errors, "train.lr", train.lr, 0.0)
    _at_least(errors, "train.min_lr", train.min_lr, 0.0)
    _at_least(errors, "train.lr_warmup_steps", train.lr_warmup_steps, 0)
    mbs_ok = _at_least(errors, "train.micro_batch_size", train.micro_batch_size, 1)
    gbs_ok = _at_least(errors, "train.global_batch_size", train.global_batch_size, 1)
    if mbs_ok and gbs_ok:
        gbs, mbs = train.global_batch_size, train.micro_batch_size
        if train_dp is not None and gbs % (mbs * train_dp):
            errors.append(
                f"train.global_batch_size={gbs} is not divisible by "
                f"train.micro_batch_size={mbs} * data-parallel size {train_dp} "
                f"(from train_layout and the world size)"
            )
        elif gbs % mbs:
            errors.append(
                f"train.global_batch_size={gbs} is not divisible by train.micro_batch_size={mbs}"
            )
    # The RL batch is every sampled response: prompts_per_step * group_size rows, split
    # over DP ranks and microbatches.
    samples = cfg.rollout.prompts_per_step * cfg.grpo.group_size
    if mbs_ok and train_dp is not None and samples % (train.micro_batch_size * train_dp):
        errors.append(
            f"rollout.prompts_per_step * grpo.group_size = {cfg.rollout.prompts_per_step} * "
            f"{cfg.grpo.group_size} = {samples} sampled responses do not split into "
            f"train.micro_batch_size={train.micro_batch_size} * data-parallel size {train_dp}"
        )


def _check_grpo(errors: list[str], grpo: Any) -> None:
    # The loss's own registries (valid names live next to the code that implements them).
    from r1mega.algorithms import ADVANTAGES, KL_ESTIMATORS, LOSS_AGGS, RATIO_LEVELS

    _at_least(
        errors,
        "grpo.group_size",
        grpo.group_size,
        2,
        " (group-relative advantages need at least two samples per prompt)",
    )
    # Any clip ratio >= 0 is computable; >= 1 leaves that side unclipped (R1: 10).
    _at_least(errors, "grpo.clip_low", grpo.clip_low, 0.0)
    _at_least(errors, "grpo.clip_high", grpo.clip_high, 0.0)
    _at_least(errors, "grpo.kl_coef", grpo.kl_coef, 0.0)
    _at_least(errors, "grpo.epochs_per_step", grpo.epochs_per_step, 1)
    _one_of(errors, "grpo.kl_estimator", grpo.kl_estimator, KL_ESTIMATORS)
    _one_of(errors, "grpo.advantage", grpo.advantage, ADVANTAGES)
    _one_of(errors, "grpo.loss_agg", grpo.loss_agg, LOSS_AGGS)
    _one_of(errors, "grpo.ratio_level", grpo.ratio_level, RATIO_LEVELS)
    if grpo.dual_clip is not None and grpo.dual_clip <= 1.0:
        errors.append(f"grpo.dual_clip={grpo.dual_clip} must be > 1 (dual-clip PPO bound)")
    if grpo.tis_cap is not None and grpo.tis_cap <= 0.0:
        errors.append(f"grpo.tis_cap={grpo.tis_cap} must be > 0")


# ---------------------------------------------------------------- R1's update schedule
def _check_rl_schedule(errors: list[str], cfg: Any, train_dp: int | None) -> None:
    """Minibatches of whole groups, the reference reset, the response-length schedule,
    and what context parallelism needs of them (r1mega.training.grpo_step)."""
    grpo, rollout, train = cfg.grpo, cfg.rollout, cfg.train
    _at_least(errors, "grpo.reference_reset_interval", grpo.reference_reset_interval, 0)
    if _at_least(errors, "grpo.minibatches", grpo.minibatches, 1) \
            and rollout.prompts_per_step is not None and rollout.prompts_per_step >= 1:
        if rollout.prompts_per_step % grpo.minibatches:
            errors.append(
                f"grpo.minibatches={grpo.minibatches} does not divide "
                f"rollout.prompts_per_step={rollout.prompts_per_step} (each minibatch is "
                "one optimizer update on whole prompt groups)")
        elif train_dp is not None and grpo.minibatches > 1 and train.micro_batch_size >= 1:
            rows = rollout.prompts_per_step // grpo.minibatches * grpo.group_size
            if rows % (train.micro_batch_size * train_dp):
                errors.append(
                    f"a minibatch of rollout.prompts_per_step / grpo.minibatches = "
                    f"{rollout.prompts_per_step // grpo.minibatches} groups x "
                    f"grpo.group_size={grpo.group_size} = {rows} responses does not split "
                    f"into train.micro_batch_size={train.micro_batch_size} * data-parallel "
                    f"size {train_dp}")
    last = 1
    prompt_budget = train.seq_length - rollout.max_new_tokens
    cp = cfg.train_layout.cp
    for i, phase in enumerate(rollout.length_schedule):
        key = f"rollout.length_schedule[{i}]"
        if phase.from_step is None or phase.from_step <= last:
            errors.append(f"{key}.from_step={_fmt(phase.from_step)} must be > {last} (phases "
                          "start after step 1 and after the previous phase)")
        else:
            last = phase.from_step
        if not _at_least(errors, f"{key}.max_new_tokens", phase.max_new_tokens, 1):
            continue
        seq = prompt_budget + phase.max_new_tokens
        if seq < 1:
            errors.append(f"{key}.max_new_tokens={phase.max_new_tokens} gives a sequence "
                          f"length of {seq} (train.seq_length - rollout.max_new_tokens + it)")
        elif cp is not None and cp > 1 and seq % (2 * cp):
            errors.append(
                f"{key}.max_new_tokens={phase.max_new_tokens} gives a sequence length of "
                f"{seq}, not divisible by 2*train_layout.cp={2 * cp} (context parallelism "
                "gives each rank two load-balanced chunks)")
    if cp is not None and cp > 1 and train.pack_sequences:
        errors.append(
            f"train.pack_sequences=true with train_layout.cp={cp}: packed (THD) rollouts are "
            "not split over context-parallel ranks; set train.pack_sequences=false (padded "
            "rows are split into load-balanced chunks) or train_layout.cp=1")
    if cp is not None and cp > 1 and rollout.routing_replay:
        errors.append(
            f"rollout.routing_replay=true with train_layout.cp={cp}: the replayed experts are "
            "recorded per whole sequence and not split over context-parallel ranks; set "
            "rollout.routing_replay=false or train_layout.cp=1")


def _check_misc(errors: list[str], cfg: Any) -> None:
    rollout = cfg.rollout
    _at_least(errors, "rollout.prompts_per_step", rollout.prompts_per_step, 1)
    _at_least(errors, "rollout.max_new_tokens", rollout.max_new_tokens, 1)
    _at_least(errors, "rollout.temperature", rollout.temperature, 0.0)
    _at_least(errors, "rollout.top_k", rollout.top_k, 0)
    if not 0.0 < rollout.top_p <= 1.0:
        errors.append(f"rollout.top_p={rollout.top_p} must be in (0, 1]")
    _check_rollout_engine(errors, cfg)
    _check_sources(errors, cfg)
    _one_of(errors, "logging.wandb_mode", cfg.logging.wandb_mode, WANDB_MODES)
    _at_least(errors, "logging.log_interval", cfg.logging.log_interval, 1)
    _one_of(errors, "tokenizer.type", cfg.tokenizer.type, TOKENIZER_TYPES)
    _one_of(errors, "data.template", cfg.data.template, TEMPLATES)
    _at_least(errors, "checkpoint.save_interval", cfg.checkpoint.save_interval, 0)
    _at_least(errors, "slurm.nodes", cfg.slurm.nodes, 1)
    _at_least(errors, "slurm.gpus_per_node", cfg.slurm.gpus_per_node, 1)
    _at_least(errors, "launch.nproc_per_node", cfg.launch.nproc_per_node, 1)


def _check_sources(errors: list[str], cfg: Any) -> None:
    """Mixed prompt sources (stage-2 RL) and the reward model they may need."""
    from r1mega.data.sources import REWARD_KINDS

    names = [s.name for s in cfg.data.sources]
    for i, source in enumerate(cfg.data.sources):
        key = f"data.sources[{i}]"
        _one_of(errors, f"{key}.reward", source.reward, REWARD_KINDS)
        _at_least(errors, f"{key}.weight", source.weight, 0.0)
        if names.count(source.name) > 1:
            errors.append(f"{key}.name={source.name} is used by more than one source")
    if cfg.data.sources and sum(max(s.weight, 0.0) for s in cfg.data.sources) <= 0:
        errors.append("data.sources: the weights sum to 0 (no prompts would be drawn)")
    needs_model = any(s.reward == "reward_model" for s in cfg.data.sources)
    if needs_model and not cfg.rewards.reward_model.load:
        errors.append("data.sources has a reward_model source but rewards.reward_model.load "
                      "is not set (a Hugging Face *ForSequenceClassification directory or its "
                      "conversion)")


def _check_readability(errors: list[str], key: str, readability: Any) -> None:
    """A readability filter's settings (the same filter serves SFT data and sampling)."""
    _one_of(errors, f"{key}.language", readability.language, (None, "en", "zh"))
    if not 0.0 <= readability.min_language_fraction <= 1.0:
        errors.append(f"{key}.min_language_fraction={readability.min_language_fraction} "
                      "must be in [0, 1]")
    if readability.max_response_tokens is not None:
        _at_least(errors, f"{key}.max_response_tokens", readability.max_response_tokens, 1)


def _check_sample(errors: list[str], sample: Any) -> None:
    """Rejection sampling (`r1mega sample`); ``sample.output_dir`` is checked when the
    command runs, since other commands never need it."""
    _at_least(errors, "sample.samples_per_prompt", sample.samples_per_prompt, 1)
    if sample.samples_per_prompt is not None and sample.samples_per_prompt > 10007:
        errors.append(f"sample.samples_per_prompt={sample.samples_per_prompt} must be <= 10007 "
                      "(per-request seeds of neighbouring prompts would overlap)")
    _at_least(errors, "sample.prompts_per_batch", sample.prompts_per_batch, 1)
    if sample.max_kept_per_prompt is not None:
        _at_least(errors, "sample.max_kept_per_prompt", sample.max_kept_per_prompt, 1)
    if sample.max_prompts is not None:
        _at_least(errors, "sample.max_prompts", sample.max_prompts, 1)
    _check_readability(errors, "sample.readability", sample.readability)


SFT_DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def _check_sft(errors: list[str], sft: Any) -> None:
    """SFT and distillation (`r1mega sft` / `r1mega distill`); whether ``sft.train_path``
    is set is checked when those commands run, since other commands never need it."""
    _at_least(errors, "sft.epochs", sft.epochs, 1)
    for key in ("prompt_field", "response_field"):
        if not getattr(sft, key):
            errors.append(f"sft.{key} must be a non-empty field name")
    if sft.prompt_field and sft.prompt_field == sft.response_field:
        errors.append(f"sft.prompt_field and sft.response_field are both "
                      f"{sft.prompt_field!r}: the response would repeat the prompt")
    path = sft.train_path
    if path and not str(path).startswith("builtin:") \
            and not str(path).lower().endswith(SFT_DATA_SUFFIXES):
        errors.append(f"sft.train_path={path} must be a {', '.join(SFT_DATA_SUFFIXES)} file "
                      "or builtin:coldstart_arithmetic")
    _check_readability(errors, "sft.readability", sft.readability)


def _check_eval(errors: list[str], cfg: Any) -> None:
    """Held-out evaluation during training (``eval.*``)."""
    ev = cfg.eval
    _at_least(errors, "eval.interval", ev.interval, 0)
    _at_least(errors, "eval.k", ev.k, 1)
    _at_least(errors, "eval.temperature", ev.temperature, 0.0)
    if not 0.0 < ev.top_p <= 1.0:
        errors.append(f"eval.top_p={ev.top_p} must be in (0, 1]")
    if ev.max_new_tokens is not None:
        _at_least(errors, "eval.max_new_tokens", ev.max_new_tokens, 1)
    if ev.limit is not None:
        _at_least(errors, "eval.limit", ev.limit, 1)
    _at_least(errors, "eval.table_rows", ev.table_rows, 0)
    if ev.path and str(ev.path).startswith("builtin:"):
        from r1mega.data.tasks import BUILTIN_PREFIX, BUILTIN_TASKS

        if str(ev.path).removeprefix(BUILTIN_PREFIX) not in BUILTIN_TASKS:
            errors.append(f"eval.path={ev.path!r}: unknown built-in task; known: "
                          + ", ".join(BUILTIN_PREFIX + t for t in BUILTIN_TASKS))
    if ev.interval and not (ev.path or cfg.data.eval_path):
        errors.append(f"eval.interval={ev.interval} but there is nothing to evaluate on: "
                      "set eval.path or data.eval_path (a file or builtin:<task>)")


def _check_rollout_engine(errors: list[str], cfg: Any) -> None:
    rollout, layout = cfg.rollout, cfg.generation_layout
    _one_of(errors, "rollout.engine", rollout.engine, ROLLOUT_ENGINES)
    _one_of(errors, "rollout.refit_backend", rollout.refit_backend, REFIT_BACKENDS)
    _at_least(errors, "rollout.max_batch_size", rollout.max_batch_size, 1)
    _at_least(errors, "rollout.max_tokens_per_step", rollout.max_tokens_per_step, 1)
    if rollout.kv_cache_gib is not None and rollout.kv_cache_gib <= 0:
        errors.append(f"rollout.kv_cache_gib={rollout.kv_cache_gib} must be > 0 (or null)")
    if rollout.kv_block_tokens is not None:
        _at_least(errors, "rollout.kv_block_tokens", rollout.kv_block_tokens, 1)
        from r1mega.rollout.kv_footprint import MLA_BLOCK_TOKENS

        if cfg.model.arch == "deepseek_v3" and rollout.kv_block_tokens != MLA_BLOCK_TOKENS:
            errors.append(f"rollout.kv_block_tokens={rollout.kv_block_tokens} must be "
                          f"{MLA_BLOCK_TOKENS} for deepseek_v3 (MLA's latent cache)")
    if rollout.logprob_outlier_threshold <= 0:
        errors.append(f"rollout.logprob_outlier_threshold={rollout.logprob_outlier_threshold} "
                      "must be > 0")
    if rollout.logprob_check is not None and rollout.logprob_check <= 0:
        errors.append(f"rollout.logprob_check={rollout.logprob_check} must be > 0 (or null)")
    if rollout.routing_replay:
        if cfg.model.num_experts is None:
            errors.append("rollout.routing_replay=true needs an MoE model (model.num_experts)")
        if rollout.engine != "colocated":
            errors.append("rollout.routing_replay=true needs rollout.engine=colocated")
        if cfg.train.recompute is not None:
            errors.append(f"rollout.routing_replay=true with train.recompute="
                          f"{cfg.train.recompute}: replayed routing is not re-applied when "
                          "activations are recomputed; set train.recompute=null")
    if rollout.engine != "colocated":
        return
    why = "the rollout engine decodes without"
    if layout.pp != 1:
        errors.append(f"generation_layout.pp={layout.pp} must be 1 ({why} pipeline "
                      "parallelism; give generation more tp or ep instead)")
    if layout.cp != 1:
        errors.append(f"generation_layout.cp={layout.cp} must be 1 ({why} context parallelism)")
    if layout.sequence_parallel:
        errors.append("generation_layout.sequence_parallel=true is not supported "
                      f"({why} sequence parallelism: a decode step has one token per row)")


def validate_config(cfg: Any, world_size: int | None = None) -> None:
    """Raise :class:`ConfigError` listing every cross-field problem in ``cfg``.

    ``cfg`` is the merged config (an omegaconf DictConfig or the R1MegaConfig dataclass
    object; only attribute access is used). ``world_size`` enables the checks that need
    the number of ranks (layout tiling, batch divisibility); it is not inferred from
    ``slurm``/``launch`` because the same YAML is often run at several scales.
    """
    errors: list[str] = []
    if world_size is not None and (not isinstance(world_size, int) or world_size < 1):
        raise ConfigError(f"world_size={world_size} must be a positive integer")

    _check_model(errors, cfg.model)
    train_dp: int | None = None
    for name in LAYOUT_NAMES:
        layout = getattr(cfg, name)
        usable = _check_layout(errors, name, layout, cfg, world_size)
        if name == "train_layout" and usable and world_size is not None:
            train_dp = data_parallel_size(layout, world_size, name=name)
    _check_training(errors, cfg, train_dp)
    _check_grpo(errors, cfg.grpo)
    _check_rl_schedule(errors, cfg, train_dp)
    _check_misc(errors, cfg)
    _check_sample(errors, cfg.sample)
    _check_sft(errors, cfg.sft)
    _check_eval(errors, cfg)

    if errors:
        if len(errors) == 1:
            message = f"invalid config: {errors[0]}"
        else:
            message = f"invalid config ({len(errors)} problems):\n" + "\n".join(
                f"  - {e}" for e in errors
            )
        raise ConfigError(message, errors)
