"""Tests for r1mega.config: loading, overrides, inheritance, and every error message.

The messages are part of the contract (users fix YAML from them), so the tests assert on
the dotted key and the numbers in each message, not only on the exception type.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ReadonlyConfigError

from r1mega.config import (
    ConfigError,
    LayoutConfig,
    R1MegaConfig,
    data_parallel_size,
    expert_data_parallel_size,
    load_config,
    validate_config,
)
from r1mega.config.validate import suggest_pp_layers

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = CONFIGS / "tiny_cpu.yaml"
BIG = CONFIGS / "r1_zero_671b.yaml"
QWEN = CONFIGS / "qwen2_5_7b.yaml"


def error_of(*overrides: str, path: Path = TINY, world_size: int | None = 2) -> str:
    """Load with overrides that must fail; return the ConfigError message."""
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides), world_size=world_size)
    return str(info.value)


# --------------------------------------------------------------------------- shipped YAMLs


def test_tiny_cpu_loads() -> None:
    cfg = load_config(str(TINY), world_size=2)
    assert cfg.model.arch == "deepseek_v3"
    assert cfg.model.num_layers == 4 and cfg.model.first_k_dense_layers == 1
    assert cfg.model.num_experts == 4 and cfg.model.mtp_num_layers == 1
    assert cfg.precision.params_dtype == "float32"
    assert (cfg.train_layout.pp, cfg.generation_layout.tp, cfg.generation_layout.ep) == (2, 2, 2)
    assert cfg.launch.nproc_per_node == 2
    assert cfg.train.lr == pytest.approx(2e-4)
    assert [(r.name, r.weight) for r in cfg.rewards.specs] == [("accuracy", 1.0), ("format", 0.5)]
    assert cfg.checkpoint.save_dir == "runs/tiny_cpu/checkpoints"
    assert data_parallel_size(cfg.train_layout, 2) == 1
    assert data_parallel_size(cfg.generation_layout, 2) == 1


def test_r1_zero_671b_loads_on_512_ranks() -> None:
    cfg = load_config(BIG, world_size=512)
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.vocab_size) == (
        61,
        7168,
        128,
        129280,
    )
    assert (m.num_experts, m.moe_topk, m.moe_router_num_groups, m.moe_router_group_topk) == (
        256,
        8,
        8,
        4,
    )
    assert m.num_query_groups is None and m.rope_type == "yarn"
    assert m.rope_scaling_factor == 40 and m.max_position_embeddings == 163840
    assert sum(cfg.train_layout.pp_layers) == 61 and len(cfg.train_layout.pp_layers) == 16
    assert cfg.grpo.group_size == 16 and cfg.grpo.kl_coef == pytest.approx(0.001)
    assert cfg.train.lr == pytest.approx(3e-6) and cfg.train.global_batch_size == 512
    assert cfg.slurm.nodes * cfg.slurm.gpus_per_node == 512
    assert data_parallel_size(cfg.train_layout, 512) == 8
    assert expert_data_parallel_size(cfg.generation_layout, 512) == 8


def test_qwen2_5_7b_loads_on_8_ranks() -> None:
    cfg = load_config([QWEN], world_size=8)
    assert cfg.model.arch == "qwen2" and cfg.model.num_query_groups == 4
    assert cfg.model.qkv_bias is True and cfg.model.tie_embeddings is False
    assert cfg.train_layout.tp == 4 and data_parallel_size(cfg.train_layout, 8) == 2


def test_loaded_config_is_read_only_and_typed() -> None:
    cfg = load_config(TINY)
    assert OmegaConf.get_type(cfg) is R1MegaConfig
    with pytest.raises(ReadonlyConfigError):
        cfg.train.lr = 1.0


def test_validate_accepts_dataclass_object() -> None:
    obj = OmegaConf.to_object(load_config(TINY))
    assert isinstance(obj, R1MegaConfig)
    validate_config(obj, world_size=2)
    obj.train_layout.tp = 3
    with pytest.raises(ConfigError, match=r"train_layout\.tp=3 does not divide"):
        validate_config(obj, world_size=None)


# --------------------------------------------------------------------- overrides & files


def test_overrides_apply_in_order() -> None:
    cfg = load_config(TINY, ["train.lr=0.5", "precision.fp8=null", "train.lr=0.25"])
    assert cfg.train.lr == 0.25
    cfg = load_config(TINY, ["train.lr=0.5", "train_layout.pp_layers=[3,1]"], world_size=2)
    assert cfg.train.lr == 0.5
    assert list(cfg.train_layout.pp_layers) == [3, 1]


def test_several_files_merge_in_order(tmp_path: Path) -> None:
    extra = tmp_path / "extra.yaml"
    extra.write_text("train:\n  steps: 7\n")
    cfg = load_config([TINY, extra])
    assert cfg.train.steps == 7 and cfg.model.num_layers == 4


def test_defaults_inheritance(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model.yaml").write_text(
        "model: {arch: llama, num_layers: 4, hidden_size: 64, ffn_hidden_size: 128,"
        " num_attention_heads: 4, vocab_size: 256}\ntrain: {steps: 5, lr: 1.0e-3}\n"
    )
    (tmp_path / "base" / "grpo.yaml").write_text("grpo: {group_size: 8}\ntrain: {steps: 6}\n")
    child = tmp_path / "child.yaml"
    child.write_text("defaults: [base/model.yaml, base/grpo.yaml]\ntrain:\n  lr: 2.0e-3\n")
    cfg = load_config(child)
    assert cfg.model.arch == "llama" and cfg.model.num_layers == 4
    assert cfg.grpo.group_size == 8
    assert cfg.train.steps == 6  # later default wins over earlier default
    assert cfg.train.lr == pytest.approx(2e-3)  # the file itself wins over its defaults
    # Overrides still win over everything.
    assert load_config(child, ["train.steps=9"]).train.steps == 9


def test_defaults_chain_and_cycle(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(f"defaults: {TINY}\ntrain: {{steps: 11}}\n")
    (tmp_path / "b.yaml").write_text("defaults: [a.yaml]\ngrpo: {group_size: 2}\n")
    cfg = load_config(tmp_path / "b.yaml", world_size=2)
    assert (cfg.train.steps, cfg.grpo.group_size, cfg.model.num_layers) == (11, 2, 4)

    (tmp_path / "x.yaml").write_text("defaults: [y.yaml]\n")
    (tmp_path / "y.yaml").write_text("defaults: [x.yaml]\n")
    with pytest.raises(ConfigError, match="circular defaults"):
        load_config(tmp_path / "x.yaml")


def test_missing_default_names_the_including_file(tmp_path: Path) -> None:
    child = tmp_path / "child.yaml"
    child.write_text("defaults: [nothere.yaml]\n")
    with pytest.raises(ConfigError) as info:
        load_config(child)
    assert "nothere.yaml" in str(info.value) and "child.yaml" in str(info.value)


def test_nonexistent_file() -> None:
    with pytest.raises(ConfigError, match=r"config file not found: .*no_such\.yaml"):
        load_config("configs/no_such.yaml")


def test_bad_yaml_and_non_mapping(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1,\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: top level must be a mapping"):
        load_config(lst)


@pytest.mark.parametrize("override", ["train.steps", "=3", "+train.steps=3", "train..lr=1"])
def test_malformed_override(override: str) -> None:
    msg = error_of(override)
    assert "malformed override" in msg and repr(override) in msg


# ---------------------------------------------------------------- keys, types, missing


def test_unknown_key_suggests_closest() -> None:
    msg = error_of("model.numlayers=3")
    assert "model.numlayers" in msg and "did you mean 'model.num_layers'" in msg


def test_unknown_key_in_yaml_names_file(tmp_path: Path) -> None:
    f = tmp_path / "typo.yaml"
    f.write_text("grpo:\n  group_sise: 4\n")
    with pytest.raises(ConfigError) as info:
        load_config([TINY, f])
    msg = str(info.value)
    assert "typo.yaml" in msg and "grpo.group_sise" in msg and "grpo.group_size" in msg


def test_unknown_top_level_key_lists_sections() -> None:
    msg = error_of("foo=1")
    assert "unknown key 'foo'" in msg and "train_layout" in msg


def test_unknown_key_inside_list_item_has_full_path() -> None:
    msg = error_of("rewards.specs=[{name: accuracy, wieght: 1}]")
    assert "rewards.specs[0].wieght" in msg and "rewards.specs[0].weight" in msg


def test_wrong_type_names_key() -> None:
    msg = error_of("train.steps=abc")
    assert "train.steps" in msg and "abc" in msg and "Integer" in msg
    msg = error_of("rewards.specs=[{name: a, weight: heavy}]")
    assert "rewards.specs[0].weight" in msg
    msg = error_of("train_layout=3")
    assert "train_layout must be a mapping" in msg
    msg = error_of("train_layout.pp_layers=[2, x]")
    assert "train_layout.pp_layers[1]" in msg


def test_missing_required_values(tmp_path: Path) -> None:
    f = tmp_path / "partial.yaml"
    f.write_text("model: {arch: llama, num_layers: 2}\n")
    with pytest.raises(ConfigError) as info:
        load_config(f)
    msg = str(info.value)
    assert "missing required value" in msg
    for key in ("model.hidden_size", "model.vocab_size", "model.num_attention_heads"):
        assert key in msg
    assert "model.num_layers" not in msg
    msg = error_of("rewards.specs=[{weight: 1.0}]")
    assert "rewards.specs[0].name" in msg


def test_interpolation_errors_name_key() -> None:
    assert load_config(TINY, ["train.min_lr=${train.lr}"]).train.min_lr == pytest.approx(2e-4)
    msg = error_of("train.lr=${train.nope}")
    assert "train.lr" in msg and "train.nope" in msg


# ------------------------------------------------------------------------ layout checks


@pytest.mark.parametrize("layout", ["train_layout", "generation_layout"])
def test_tp_must_divide_heads(layout: str) -> None:
    msg = error_of(f"{layout}.tp=3", world_size=None)
    assert f"{layout}.tp=3 does not divide model.num_attention_heads=4" in msg
    assert f"{layout}.tp=3 does not divide model.ffn_hidden_size=128" in msg


def test_tp_must_divide_query_groups() -> None:
    msg = error_of("train_layout.tp=7", path=QWEN, world_size=None)
    assert "train_layout.tp=7 does not divide model.num_query_groups=4" in msg


def test_etp_must_divide_moe_ffn() -> None:
    msg = error_of("generation_layout.etp=3", world_size=None)
    assert "generation_layout.etp=3 does not divide model.moe_ffn_hidden_size=32" in msg


def test_ep_must_divide_experts() -> None:
    msg = error_of("generation_layout.ep=3", world_size=None)
    assert "generation_layout.ep=3 does not divide model.num_experts=4" in msg


def test_ep_on_dense_model() -> None:
    msg = error_of("generation_layout.ep=2", path=QWEN, world_size=None)
    assert "generation_layout.ep=2" in msg and "dense" in msg
    msg = error_of("train_layout.etp=2", path=QWEN, world_size=None)
    assert "train_layout.etp=2" in msg and "model.num_experts is null" in msg


@pytest.mark.parametrize("key", ["tp", "pp", "ep", "etp", "cp"])
def test_sizes_must_be_positive(key: str) -> None:
    msg = error_of(f"generation_layout.{key}=0", world_size=None)
    assert f"generation_layout.{key}=0 must be >= 1" in msg


def test_pp_must_divide_layers_and_suggests_pp_layers() -> None:
    msg = error_of("train_layout.pp=3", world_size=None)
    assert "train_layout.pp=3 does not divide model.num_layers=4" in msg
    assert "train_layout.pp_layers" in msg and "[1, 2, 1]" in msg


def test_pp_layers_rules() -> None:
    msg = error_of("train_layout.pp_layers=[1,2,1]", world_size=None)
    assert "train_layout.pp_layers=[1, 2, 1] has 3 entries but train_layout.pp=2" in msg
    msg = error_of("train_layout.pp_layers=[1,2]", world_size=None)
    assert "sums to 3 but model.num_layers=4" in msg
    msg = error_of("train_layout.pp_layers=[4,0]", world_size=None)
    assert "train_layout.pp_layers[1]=0 must be >= 1" in msg
    msg = error_of("train_layout.pp=4", "train_layout.pp_layers=[1,1,2,0]", world_size=None)
    assert "middle stages must hold the same number" in msg
    msg = error_of("generation_layout.pp_layers=[2,2]", world_size=None)
    assert "generation_layout.pp_layers=[2, 2] with generation_layout.pp=1" in msg
    load_config(TINY, ["generation_layout.pp_layers=[4]"], world_size=2)
    # First and last stage may differ from the (equal) middle stages.
    load_config(TINY, ["train_layout.pp=4", "train_layout.pp_layers=[1,1,1,1]"], world_size=None)


def test_suggest_pp_layers_is_valid() -> None:
    for num_layers, pp in [(61, 16), (4, 3), (28, 3), (7, 2), (30, 4)]:
        split = suggest_pp_layers(num_layers, pp)
        assert split is not None
        assert len(split) == pp and sum(split) == num_layers and min(split) >= 1
        assert len(set(split[1:-1])) <= 1


def test_sequence_parallel_needs_tp() -> None:
    msg = error_of("train_layout.sequence_parallel=true", world_size=None)
    assert "train_layout.sequence_parallel=true requires train_layout.tp > 1" in msg
    # The simple sampler never builds the generation layout, so it may say anything valid.
    load_config(TINY, ["generation_layout.sequence_parallel=true", "rollout.engine=simple"],
                world_size=2)


def test_cp_needs_seq_length_divisible_by_2cp() -> None:
    msg = error_of("generation_layout.cp=3", "train.seq_length=64", world_size=None)
    assert "generation_layout.cp=3 requires train.seq_length=64" in msg and "2*cp=6" in msg


def test_world_size_must_tile_layouts() -> None:
    msg = error_of(world_size=3)
    assert "train_layout: world size 3 is not divisible by tp*pp*cp = 1*2*1 = 2" in msg
    assert "generation_layout: world size 3" in msg
    msg = error_of("train_layout.ep=64", path=BIG, world_size=512)
    assert "train_layout: world size 512 is not divisible by etp*ep*pp = 1*64*16 = 1024" in msg
    # Without a world size the same layout is only checked against the model.
    load_config(BIG, ["train_layout.ep=64"])


def test_bad_world_size_argument() -> None:
    with pytest.raises(ConfigError, match="world_size=0"):
        load_config(TINY, world_size=0)


def test_data_parallel_size_helpers() -> None:
    layout = LayoutConfig(tp=2, pp=2, ep=4, etp=1, cp=1)
    assert data_parallel_size(layout, 16) == 4
    assert expert_data_parallel_size(layout, 16) == 2
    with pytest.raises(ConfigError, match=r"gen: world size 6 is not divisible by tp\*pp\*cp"):
        data_parallel_size(layout, 6, name="gen")


# -------------------------------------------------------------------- other sections


def test_global_batch_divisible_by_micro_batch_times_dp() -> None:
    msg = error_of("train.global_batch_size=6", "train.micro_batch_size=4", world_size=2)
    assert "train.global_batch_size=6 is not divisible by train.micro_batch_size=4" in msg
    msg = error_of(
        "train.global_batch_size=12", "train.micro_batch_size=4", path=QWEN, world_size=8
    )
    assert "train.micro_batch_size=4 * data-parallel size 2" in msg


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("grpo.group_size=1", "grpo.group_size=1 must be >= 2"),
        ("grpo.clip_low=-0.1", "grpo.clip_low=-0.1 must be >= 0"),
        ("grpo.clip_high=-1", "grpo.clip_high=-1.0 must be >= 0"),
        ("grpo.kl_estimator=k4", "grpo.kl_estimator=k4 is not one of: k1, k2, k3"),
        ("grpo.advantage=ppo", "grpo.advantage=ppo is not one of: grpo, dr_grpo"),
        ("grpo.loss_agg=sum", "grpo.loss_agg=sum is not one of: token-mean"),
        ("grpo.ratio_level=word", "grpo.ratio_level=word is not one of: token, sequence"),
        ("train.lr_decay_style=step", "train.lr_decay_style=step is not one of"),
        ("precision.params_dtype=float16", "precision.params_dtype=float16 is not one of"),
        ("precision.fp8=e5m2", "precision.fp8=e5m2 is not one of: null, hybrid, e4m3"),
        ("precision.fp8_recipe=mx", "precision.fp8_recipe=mx is not one of"),
        ("logging.wandb_mode=cloud", "logging.wandb_mode=cloud is not one of"),
        ("model.arch=gpt2", "model.arch=gpt2 is not one of: llama, qwen2, deepseek_v3"),
        ("model.transformer_impl=apex", "model.transformer_impl=apex is not one of"),
        ("model.mtp_num_layers=-1", "model.mtp_num_layers=-1 must be >= 0"),
        ("model.first_k_dense_layers=5", "model.first_k_dense_layers=5 exceeds model.num_layers"),
        ("model.moe_topk=5", "model.moe_topk=5 exceeds model.num_experts=4"),
        ("rollout.engine=vllm", "rollout.engine=vllm is not one of: colocated, simple"),
        ("rollout.refit_backend=mpi", "rollout.refit_backend=mpi is not one of"),
        ("rollout.max_batch_size=0", "rollout.max_batch_size=0 must be >= 1"),
        ("rollout.max_tokens_per_step=0", "rollout.max_tokens_per_step=0 must be >= 1"),
        ("rollout.kv_cache_gib=0", "rollout.kv_cache_gib=0.0 must be > 0"),
        ("rollout.kv_block_tokens=16", "rollout.kv_block_tokens=16 must be 64 for deepseek_v3"),
        ("rollout.logprob_check=0", "rollout.logprob_check=0.0 must be > 0"),
        ("rollout.logprob_outlier_threshold=-1", "rollout.logprob_outlier_threshold=-1"),
        ("generation_layout.pp=2", "generation_layout.pp=2 must be 1 (the rollout engine"),
        ("generation_layout.cp=2", "generation_layout.cp=2 must be 1"),
        ("generation_layout.sequence_parallel=true",
         "generation_layout.sequence_parallel=true is not supported"),
    ],
)
def test_field_checks(override: str, expected: str) -> None:
    assert expected in error_of(override, world_size=None)


def test_routing_replay_needs_moe_and_no_recompute() -> None:
    msg = error_of("rollout.routing_replay=true", "train.recompute=full", world_size=None)
    assert "rollout.routing_replay=true with train.recompute=full" in msg
    msg = error_of("rollout.routing_replay=true", path=QWEN, world_size=None)
    assert "rollout.routing_replay=true needs an MoE model" in msg


def test_deepseek_v3_needs_experts() -> None:
    msg = error_of(
        "model.num_experts=null",
        "model.moe_ffn_hidden_size=null",
        "generation_layout.ep=1",
        world_size=None,
    )
    assert "model.num_experts must be set for model.arch=deepseek_v3" in msg
    assert "model.moe_ffn_hidden_size must be set for model.arch=deepseek_v3" in msg


def test_router_groups() -> None:
    msg = error_of("model.moe_router_num_groups=3", world_size=None)
    assert "model.moe_router_num_groups=3 does not divide model.num_experts=4" in msg
    msg = error_of(
        "model.moe_router_num_groups=2", "model.moe_router_group_topk=3", world_size=None
    )
    assert "model.moe_router_group_topk=3 exceeds model.moe_router_num_groups=2" in msg
    msg = error_of("model.moe_router_group_topk=1", world_size=None)
    assert "needs model.moe_router_num_groups" in msg


def test_query_groups_divide_heads() -> None:
    msg = error_of(
        "model.num_query_groups=3",
        "train_layout.tp=1",
        "generation_layout.tp=1",
        path=QWEN,
        world_size=None,
    )
    assert "model.num_query_groups=3 does not divide model.num_attention_heads=28" in msg


def test_all_problems_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["grpo.group_size=1", "model.arch=gpt"], world_size=2)
    assert len(info.value.errors) == 2
    assert "2 problems" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_list_fields_need_lists() -> None:
    msg = error_of("rewards.specs.0.weight=2")
    assert "rewards.specs must be a list" in msg and "per-index" in msg
    assert "rollout.stop must be a list" in error_of("rollout.stop=abc")
    assert list(load_config(TINY, ["rollout.stop=[a, b]"]).rollout.stop) == ["a", "b"]


def test_rollout_batch_must_split_over_dp_and_microbatches() -> None:
    msg = error_of("rollout.prompts_per_step=3", "grpo.group_size=2", "train.micro_batch_size=4",
                   world_size=2)
    assert "rollout.prompts_per_step * grpo.group_size = 3 * 2 = 6" in msg
    assert "train.micro_batch_size=4" in msg


# ------------------------------------------------------- held-out evaluation (eval.*)


@pytest.mark.parametrize(("overrides", "needle"), [
    (["eval.interval=-1"], "eval.interval=-1"),
    (["eval.k=0"], "eval.k=0"),
    (["eval.top_p=0"], "eval.top_p=0"),
    (["eval.temperature=-0.5"], "eval.temperature=-0.5"),
    (["eval.max_new_tokens=0"], "eval.max_new_tokens=0"),
    (["eval.limit=0"], "eval.limit=0"),
    (["eval.table_rows=-1"], "eval.table_rows=-1"),
    (["eval.path=builtin:nope"], "eval.path='builtin:nope': unknown built-in task"),
    (["eval.interval=5", "data.eval_path=null"], "eval.interval=5 but there is nothing"),
])
def test_bad_eval_keys_are_named(overrides: list[str], needle: str) -> None:
    assert needle in error_of(*overrides)


def test_eval_keys_default_off_and_accept_the_r1_protocol() -> None:
    cfg = load_config(TINY, ["eval.interval=5", "eval.k=16"], world_size=2)
    assert (cfg.eval.interval, cfg.eval.k, cfg.eval.temperature, cfg.eval.top_p) == (
        5, 16, 0.6, 0.95)
    assert load_config(TINY, [], world_size=2).eval.interval == 0
