"""R1's training schedule, unit by unit: clip ratios >= 1, minibatches, the LR schedule in
optimizer updates with a warm-up that never spends an update at LR 0, the reference
reset, the response-length schedule, and the recipe that states them.

The distributed step itself (minibatches of whole groups, old log-probs before the first
update, a skipped update) is checked against an independent reference in
tests/test_grpo_step.py; the recipe run (reset, length switch, resume) in
tests/test_recipes.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from r1mega.algorithms import kl_penalty, policy_loss
from r1mega.config import ConfigError, load_config
from r1mega.training.length_schedule import (
    ResponseBudget,
    largest_response_budget,
    response_budget,
)
from tests.grpo_reference import lr_at

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY, BIG = CONFIGS / "tiny_cpu.yaml", CONFIGS / "r1_zero_671b.yaml"


def _error(*overrides: str, path: Path = TINY, world_size: int | None = 2) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides), world_size=world_size)
    return str(info.value)


# --------------------------------------------------------------------------- clip ratios
def test_clip_ratio_ten_is_legal_and_never_clips_below() -> None:
    """R1's clip ratio 10: the lower bound 1 - 10 < 0 is never reached, the upper 11 binds
    only beyond it; the loss is computable (it used to raise at the first step)."""
    cfg = load_config(BIG, world_size=512)
    assert cfg.grpo.clip_low == 10.0 and cfg.grpo.clip_high == 10.0
    logp = torch.tensor([[-1.0, -2.0, -0.5, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -1.0, -3.5, -0.2]])
    adv = torch.tensor([-1.0])
    mask = torch.ones(1, 4)
    loss, stats = policy_loss(logp, old, adv, mask, clip_low=10.0, clip_high=10.0)
    ratio = torch.exp(logp.detach() - old)  # [1.65, 0.37, 20.1, 1.22]
    clipped = torch.minimum(ratio, torch.tensor(11.0))
    expected = (torch.maximum(ratio, clipped)).mean()  # -A * max(r, clip(r)) for A = -1
    assert float(loss) == pytest.approx(float(expected))
    assert float(stats["clip_frac"]) == 0.0  # A < 0 and r > 11: the unclipped term wins
    loss.backward()
    assert torch.allclose(logp.grad, ratio / 4)


@pytest.mark.parametrize(("override", "expected"), [
    ("grpo.clip_low=-0.5", "grpo.clip_low=-0.5 must be >= 0"),
    ("grpo.minibatches=0", "grpo.minibatches=0 must be >= 1"),
    ("grpo.minibatches=3", "grpo.minibatches=3 does not divide rollout.prompts_per_step=4"),
    ("grpo.reference_reset_interval=-1", "grpo.reference_reset_interval=-1 must be >= 0"),
    ("rollout.length_schedule=[{from_step: 1, max_new_tokens: 64}]",
     "rollout.length_schedule[0].from_step=1 must be > 1"),
    ("rollout.length_schedule=[{from_step: 5, max_new_tokens: 64}, "
     "{from_step: 5, max_new_tokens: 96}]", "rollout.length_schedule[1].from_step=5 must be > 5"),
    ("rollout.length_schedule=[{from_step: 5, max_new_tokens: 0}]",
     "rollout.length_schedule[0].max_new_tokens=0 must be >= 1"),
])
def test_schedule_errors_name_the_key(override: str, expected: str) -> None:
    assert expected in _error(override)


def test_minibatches_must_split_over_dp_and_microbatches() -> None:
    # 4 prompts x 8 samples in 2 minibatches = 16 rows; 16 % (micro 4 x DP 8) != 0.
    msg = _error("grpo.minibatches=2", "train.micro_batch_size=4", "train_layout.pp=1",
                 "generation_layout.tp=1", "generation_layout.ep=1", world_size=8)
    assert "16 responses does not split into train.micro_batch_size=4 * data-parallel " \
           "size 8" in msg


def test_context_parallel_refuses_packed_rollouts_routing_replay_checks_all_phases() -> None:
    msg = _error("train_layout.cp=2", "train_layout.pp=1", "train.seq_length=480",
                 "rollout.length_schedule=[{from_step: 3, max_new_tokens: 50}]")
    assert "train.pack_sequences=true with train_layout.cp=2" in msg
    assert "rollout.length_schedule[0].max_new_tokens=50 gives a sequence length of 482, " \
           "not divisible by 2*train_layout.cp=4" in msg
    load_config(TINY, ["train_layout.cp=2", "train_layout.pp=1", "train.pack_sequences=false"],
                world_size=2)
    # Routing replay composes with minibatches (tests/test_rollout_engine.py), not with CP.
    msg = _error("train_layout.cp=2", "train_layout.pp=1", "rollout.routing_replay=true")
    assert "rollout.routing_replay=true with train_layout.cp=2" in msg


# ------------------------------------------------------------------------- LR schedule
class _Groups:
    def __init__(self) -> None:
        self.param_groups = [{"lr": 0.0}]


@pytest.mark.parametrize(("style", "warmup", "total"), [
    ("constant", 3, 10), ("cosine", 4, 12), ("linear", 0, 6), ("cosine", 6, 6)])
def test_lr_schedule_counts_updates_and_starts_above_zero(style: str, warmup: int,
                                                           total: int) -> None:
    """Update k runs at the closed form of tests/grpo_reference.py: k/W of the LR in the
    warm-up (never 0), then the decay reaching min_lr one update after the last."""
    from omegaconf import OmegaConf

    from r1mega.config.schema import TrainConfig
    from r1mega.training.optim import build_lr_scheduler, skip_update

    t = dict(lr=1e-3, min_lr=1e-4, lr_warmup_steps=warmup, lr_decay_style=style)
    opt = _Groups()
    scheduler = build_lr_scheduler(opt, OmegaConf.structured(TrainConfig(**t)), total)
    lrs = [skip_update(scheduler) for _ in range(total)]  # the LR each update runs at
    assert lrs == pytest.approx([lr_at(k, total, t) for k in range(1, total + 1)])
    assert min(lrs) > 0 and lrs[-1] > t["min_lr"] - 1e-12
    if warmup:
        assert lrs[0] == pytest.approx(1e-3 / warmup)
    if style != "constant" and total > warmup:
        assert lrs[-1] == pytest.approx(1e-4 + 0.9e-3 * (
            0.5 * (math.cos(math.pi * (total - warmup) / (total + 1 - warmup)) + 1)
            if style == "cosine" else 1 - (total - warmup) / (total + 1 - warmup)))


def test_schedule_spans_every_update_of_the_run() -> None:
    """With 2 minibatches x 2 epochs per step, a cosine schedule over 5 steps decays over
    20 updates (it used to reach 0 after 5, a quarter of the run)."""
    from omegaconf import OmegaConf

    from r1mega.config.schema import GRPOConfig, TrainConfig
    from r1mega.training.optim import build_lr_scheduler, skip_update, updates_per_step

    grpo = OmegaConf.structured(GRPOConfig(minibatches=2, epochs_per_step=2))
    train = OmegaConf.structured(TrainConfig(steps=5, lr=1.0, lr_decay_style="cosine"))
    total = train.steps * updates_per_step(grpo)
    assert total == 20
    scheduler = build_lr_scheduler(_Groups(), train, total)
    lrs = [skip_update(scheduler) for _ in range(total)]
    assert lrs[9] == pytest.approx(0.5 * (math.cos(math.pi * 10 / 21) + 1))
    assert lrs[-1] > 0


# --------------------------------------------------------------------- length schedule
def test_response_budget_per_step_and_largest() -> None:
    cfg = load_config(BIG, world_size=512)
    assert response_budget(cfg, 1) == ResponseBudget(32768, 33792)
    assert response_budget(cfg, 512) == ResponseBudget(32768, 33792)
    assert response_budget(cfg, 513) == ResponseBudget(65536, 66560)  # update 8,193 on
    assert response_budget(cfg, 650) == ResponseBudget(65536, 66560)
    assert largest_response_budget(cfg) == ResponseBudget(65536, 66560)
    tiny = load_config(TINY, ["rollout.length_schedule=[{from_step: 3, max_new_tokens: 96}, "
                              "{from_step: 9, max_new_tokens: 64}]"])
    assert [response_budget(tiny, s).max_new_tokens for s in (1, 2, 3, 8, 9, 30)] == \
        [48, 48, 96, 96, 64, 64]
    assert largest_response_budget(tiny) == ResponseBudget(96, 528)


def test_planner_plans_the_largest_phase() -> None:
    """`r1mega plan` sizes the KV cache, sequences and logits for 65,536-token responses."""
    from r1mega.planner.estimate import kv_bytes_per_token_layer, make_plan

    cfg = load_config(BIG, world_size=512)
    plan = make_plan(cfg, 512, 8, 80)
    g = plan.generation
    assert plan.tokens_per_microbatch == 66560
    assert g.sequences_per_replica == 8 and g.decode_rounds == 8192 // 64 // 8
    # The engine's paged buffer (r1mega.rollout.kv_footprint): the 8 sequences decoded at
    # once at full length in 64-token MLA blocks, plus megatron's dummy block.
    per_block = 64 * kv_bytes_per_token_layer(cfg.model, 8) * 61
    assert g.kv_cache == (8 * 66560 // 64 + 1) * per_block
    assert plan.updates_per_step == 16 and plan.fits, plan.problems
    first = make_plan(load_config(BIG, ["rollout.length_schedule=[]"], world_size=512),
                      512, 8, 80)
    assert first.generation.kv_cache == (8 * 33792 // 64 + 1) * per_block


# -------------------------------------------------------------------- R1's recipe values
def test_r1_zero_recipe_states_the_reported_schedule() -> None:
    cfg = load_config(BIG, world_size=512)
    g, r, t = cfg.grpo, cfg.rollout, cfg.train
    assert r.prompts_per_step * g.group_size == 8192  # outputs per rollout
    assert g.minibatches == 16 and g.epochs_per_step == 1
    assert r.prompts_per_step // g.minibatches * g.group_size == 512  # batch per update
    assert t.steps * g.minibatches == 10400  # training steps (updates)
    assert g.reference_reset_interval * g.minibatches == 400
    assert [(p.from_step, p.max_new_tokens) for p in r.length_schedule] == [(513, 65536)]
    assert (g.loss_agg, g.kl_estimator, g.kl_coef) == ("seq-mean-token-mean", "k3", 0.001)
    text = BIG.read_text()
    for needle in ("as reported: a single inner epoch", "16 mini-batches",
                   "every 400 training", "65,536"):
        assert needle in text, needle


# ------------------------------------------------------------------------------- k3 KL
def test_k3_is_accurate_near_the_reference() -> None:
    """k3 = exp(-x) - 1 + x evaluated as expm1(-x) + x: near the reference (|x| ~ 1e-3)
    float32 then loses only the cancellation against x (an absolute ~eps |x|), where the
    naive form loses eps itself (a 10-20% error on each token's value there); the
    gradient 1 - exp(-x) is within an absolute eps."""
    eps = torch.finfo(torch.float32).eps
    x = torch.linspace(-3e-3, 3e-3, 101)
    x = x[x.abs() > 1e-5].clone().requires_grad_(True)
    exact = torch.expm1(-x.detach().double()) + x.detach().double()
    k3 = kl_penalty(x, torch.zeros_like(x), "k3")
    bound = 2 * eps * x.detach().double().abs()
    assert bool(((k3.detach().double() - exact).abs() <= bound).all())
    naive = (torch.exp(-x.detach()) - 1 + x.detach()).double()
    assert float((naive - exact).abs().max()) > 10 * float(bound.max())
    k3.sum().backward()
    assert torch.allclose(x.grad.double(), -torch.expm1(-x.detach().double()), rtol=0,
                          atol=eps)
