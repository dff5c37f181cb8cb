"""A GRPO step computed a second way: the model in ``transformers``, everything else here.

Nothing in this module comes from ``r1mega.training`` or ``r1mega.algorithms``: the
rollout's log-probabilities come from the Hugging Face model's logits, and the group
advantages, the clipped (or GSPO, dual-clip, truncated-importance-sampled) policy loss
with its KL term and aggregation, global-norm clipping, the LR schedule, Adam and
DeepSeek-V3's aux-loss-free expert-bias update are written out below from their
definitions. The model runs in float64, so what the megatron step (float32) is compared
with is the exact value up to float64 rounding.

The same :data:`VARIANTS` and :func:`rollout` drive the megatron workers
(``tests/workers/grpo_variants.py``), so both sides train on identical batches.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

GROUP_SIZE = 4
SEQ = 16  # label positions per row (tokens: SEQ + 1)
LOG_RATIO_CLAMP = 20.0


@dataclass(frozen=True)
class Variant:
    """One configuration of the step: GRPO/optimizer overrides and the batch it sees."""

    name: str
    grpo: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0
    steps: int = 1
    groups: int = 2
    pack: bool = False
    sampler_logprobs: bool = False
    # Rewards of each group (GROUP_SIZE each); None: a fixed mixed pattern.
    rewards: tuple[tuple[float, ...], ...] | None = None

    def grpo_config(self) -> dict[str, Any]:
        base = dict(group_size=GROUP_SIZE, clip_low=0.2, clip_high=0.28, kl_coef=0.05,
                    kl_estimator="k3", loss_agg="token-mean")
        return {**base, **self.grpo}

    def train_config(self) -> dict[str, Any]:
        base = dict(lr=1e-3, adam_eps=1e-4, adam_beta1=0.9, adam_beta2=0.95, grad_clip=1.0,
                    micro_batch_size=2, use_distributed_optimizer=True, steps=self.steps)
        return {**base, **self.train}

    @property
    def updates(self) -> int:
        g = self.grpo_config()
        return self.steps * g.get("minibatches", 1) * g.get("epochs_per_step", 1)


_MIXED = ((1.0, 0.0, 0.5, 0.0), (1.0, 1.0, 0.0, 0.25), (0.0, 0.75, 0.5, 1.0),
          (0.25, 0.0, 1.0, 1.0))

VARIANTS: dict[str, Variant] = {v.name: v for v in [
    # GRPO as in DeepSeekMath, two steps: the second has a non-trivial KL to the reference.
    Variant("token_mean", steps=2),
    # R1's settings: clip ratio 10 (>= 1: the lower clip never binds), seq-mean-token-mean,
    # k3, several minibatches of whole groups, a warm-up that starts above 0.
    Variant("r1", grpo=dict(clip_low=10.0, clip_high=10.0, loss_agg="seq-mean-token-mean",
                            kl_coef=0.001, minibatches=2), train=dict(lr_warmup_steps=2),
            groups=4),
    Variant("dr_grpo", grpo=dict(advantage="dr_grpo", loss_agg="seq-mean-token-sum-norm")),
    Variant("gspo", grpo=dict(ratio_level="sequence", clip_low=3e-3, clip_high=4e-3,
                              loss_agg="seq-mean-token-mean", epochs_per_step=2)),
    # Several minibatches and epochs with tight clips (and a dual clip), so the later
    # updates clip; a cosine schedule over the four updates.
    Variant("minibatch_epochs", grpo=dict(minibatches=2, epochs_per_step=2, clip_low=0.02,
                                          clip_high=0.03, dual_clip=1.01, kl_estimator="k2"),
            train=dict(lr_decay_style="cosine", min_lr=1e-4), groups=4),
    # Truncated importance sampling against the sampler's log-probs; three groups, so
    # with two DP ranks the middle group straddles them.
    Variant("tis", grpo=dict(tis_cap=1.5, kl_estimator="k1"), sampler_logprobs=True,
            groups=3),
    # The first minibatch holds only uniform groups: no update, counted as skipped.
    Variant("drop_uniform", grpo=dict(drop_uniform_groups=True, minibatches=2),
            groups=4, rewards=((1.0,) * 4, (0.0,) * 4, (1.0, 0.0, 0.5, 0.0),
                               (0.5,) * 4)),
    Variant("temperature", temperature=0.7, train=dict(lr_decay_style="linear",
                                                         lr_warmup_steps=1), steps=2),
    Variant("kl_in_reward", grpo=dict(kl_in_reward=True, kl_coef=0.5), steps=2),
    # THD-packed microbatches (dense only: with MoE the padding rows of a padded batch
    # count in the router's expert-bias statistics, and the reference batches are padded).
    Variant("packed", pack=True, grpo=dict(loss_agg="seq-mean-token-mean"), steps=2),
]}

# ------------------------------------------------------------------------------ batches
def rollout(variant: Variant, vocab: int, step: int) -> dict[str, torch.Tensor | None]:
    """The step's rollout: ``tokens [B, SEQ + 1]``, ``response_mask [B, SEQ]``, ``rewards
    [B]`` and, with ``sampler_logprobs``, made-up sampler log-probabilities ``[B, SEQ]``.

    Prompts of 3-5 tokens, responses of different lengths, one empty response, padding."""
    gen = torch.Generator().manual_seed(100 + step)
    b = variant.groups * GROUP_SIZE
    tokens = torch.randint(0, vocab, (b, SEQ + 1), generator=gen)
    mask = torch.zeros(b, SEQ)
    for i in range(b):
        prompt = 3 + i % 3
        end = SEQ - (i * 5) % 7
        if i != 2:  # row 2's response is empty (stopped at once)
            mask[i, prompt - 1:end] = 1.0
    pattern = variant.rewards or _MIXED[:variant.groups]
    rewards = torch.tensor([r for group in pattern for r in group], dtype=torch.float32)
    sampler = None
    if variant.sampler_logprobs:
        sampler = -torch.empty(b, SEQ).uniform_(4.5, 6.5, generator=gen) * mask
    return {"tokens": tokens, "response_mask": mask, "rewards": rewards,
            "rollout_logprobs": sampler}


# ----------------------------------------------------------------------------- the math
def _advantages(rewards: torch.Tensor, normalize: bool) -> torch.Tensor:
    out = torch.zeros_like(rewards)
    for start in range(0, len(rewards), GROUP_SIZE):
        g = rewards[start:start + GROUP_SIZE]
        if bool((g == g[0]).all()):
            continue
        mean = sum(g.tolist()) / GROUP_SIZE
        std = math.sqrt(sum((x - mean) ** 2 for x in g.tolist()) / (GROUP_SIZE - 1))
        out[start:start + GROUP_SIZE] = (g - mean) / (std + 1e-6) if normalize else g - mean
    return out


def _uniform_rows(rewards: torch.Tensor) -> torch.Tensor:
    rows = torch.zeros(len(rewards), dtype=torch.bool)
    for start in range(0, len(rewards), GROUP_SIZE):
        g = rewards[start:start + GROUP_SIZE]
        rows[start:start + GROUP_SIZE] = bool((g == g[0]).all())
    return rows


def _kl(logp: torch.Tensor, ref: torch.Tensor, estimator: str) -> torch.Tensor:
    """Schulman's estimators of KL(pi || ref) per token, x = log pi - log ref."""
    x = (logp - ref).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if estimator == "k1":
        return x
    if estimator == "k2":
        return x * x / 2
    return torch.exp(-x) - 1 + x  # k3 (float64: no cancellation worth speaking of)


def _logprobs(model: Any, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = model(input_ids=tokens[:, :-1]).logits.to(torch.float64) / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, 1:, None])[..., 0]


def _loss(logp: torch.Tensor, old: torch.Tensor, ref: torch.Tensor | None,
          adv: torch.Tensor, mask: torch.Tensor, sampler: torch.Tensor | None,
          g: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """The minibatch's loss and the same aggregation of |per-token terms| (the scale a
    rounding error of the sum is relative to)."""
    valid = mask > 0
    a = adv[:, None].expand_as(logp)
    if g.get("ratio_level", "token") == "sequence":
        n = valid.sum(1).clamp_min(1)
        s = (((logp - old) * valid).sum(1) / n).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        ratio = torch.exp(s.detach()[:, None] + logp - logp.detach())
    else:
        ratio = torch.exp((logp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    low, high = 1 - g["clip_low"], 1 + g["clip_high"]
    pg = torch.maximum(-a * ratio, -a * ratio.clamp(low, high))
    if g.get("dual_clip") is not None:
        pg = torch.where(a < 0, torch.minimum(pg, -a * g["dual_clip"]), pg)
    if g.get("tis_cap") is not None:
        weight = torch.exp((old - sampler).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        pg = pg * weight.clamp(max=g["tis_cap"]).detach()
    per_token = pg
    if ref is not None and not g.get("kl_in_reward", False):
        per_token = pg + g["kl_coef"] * _kl(logp, ref, g["kl_estimator"])
    per_token = torch.where(valid, per_token, torch.zeros_like(per_token))
    agg = g.get("loss_agg", "token-mean")

    def aggregate(values: torch.Tensor) -> torch.Tensor:
        if agg == "token-mean":
            return values.sum() / valid.sum().clamp_min(1)
        n = valid.sum(1)
        if agg == "seq-mean-token-mean":
            per_seq = values.sum(1) / n.clamp_min(1)
        else:  # seq-mean-token-sum-norm (Dr. GRPO): a constant divisor, the budget
            per_seq = values.sum(1) / SEQ
        return per_seq.sum() / (n > 0).sum().clamp_min(1)

    return aggregate(per_token), float(aggregate(per_token.abs().detach()))


def lr_at(update: int, total: int, t: dict[str, Any]) -> float:
    """LR of update ``update`` (1-based) of ``total``: linear warm-up from lr / W (not
    0), then decay reaching ``min_lr`` one update after the last."""
    lr, min_lr = t["lr"], t.get("min_lr", 0.0)
    warmup = t.get("lr_warmup_steps", 0)
    if warmup and update <= warmup:
        return lr * update / warmup
    style = t.get("lr_decay_style", "constant")
    if style == "constant":
        return lr
    ratio = (update - warmup) / (max(total, warmup) + 1 - warmup)
    coeff = 1 - ratio if style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1)
    return min_lr + coeff * (lr - min_lr)


class _RouterCounts:
    """Tokens routed to each expert of every DeepSeek-V3 router, while autograd is on
    (the update's training passes, not the forward-only ones)."""

    def __init__(self, model: Any) -> None:
        self.counts: dict[Any, torch.Tensor] = {}
        self.handles = []
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                self.handles.append(module.register_forward_hook(self._hook))

    def _hook(self, module: Any, _inputs: Any, output: Any) -> None:
        if torch.is_grad_enabled():
            indices = output[2].reshape(-1)
            count = torch.bincount(indices, minlength=module.e_score_correction_bias.numel())
            self.counts[module] = self.counts.get(module, 0) + count

    def apply_bias_update(self, rate: float) -> None:
        """Aux-loss-free balancing (DeepSeek-V3): bias += rate * sign(mean load - load)."""
        with torch.no_grad():
            for module, count in self.counts.items():
                load = count.to(torch.float64)
                module.e_score_correction_bias += rate * torch.sign(load.mean() - load).to(
                    module.e_score_correction_bias.dtype)
        self.counts = {}


@dataclass
class ReferenceResult:
    logprobs: list[torch.Tensor]  # per step, [B, SEQ], before the step's first update
    losses: list[float]  # per update taken (skipped updates: 0.0)
    loss_scales: list[float]
    lrs: list[float]
    skipped: list[bool]
    state: dict[str, torch.Tensor]  # final weights (as saved: HF file names, float64)
    kl_ref: list[float]  # per step: token mean of the KL to the reference over its updates
    # per step, with the sampler's log-probs: token mean of |log p - sampler log p| before
    # the first update (the rollout-vs-trainer parity metric)
    parity: list[float] = field(default_factory=list)


def reference_run(hf_model: Any, variant: Variant, bias_update_rate: float = 1e-3
                  ) -> ReferenceResult:
    """Train ``hf_model`` (modified in place; float64) through ``variant``'s steps."""
    model = hf_model.to(torch.float64).eval()
    reference = copy.deepcopy(model)  # the initial policy: the KL reference
    g, t = variant.grpo_config(), variant.train_config()
    params = [(n, p) for n, p in model.named_parameters()]
    moments = {n: (torch.zeros_like(p), torch.zeros_like(p)) for n, p in params}
    adam_steps = 0
    counts = _RouterCounts(model)
    minibatches, epochs = g.get("minibatches", 1), g.get("epochs_per_step", 1)
    total = variant.updates
    out = ReferenceResult([], [], [], [], [], {}, [])
    update = 0
    for step in range(1, variant.steps + 1):
        batch = rollout(variant, hf_model.config.vocab_size, step)
        tokens, mask = batch["tokens"], batch["response_mask"].to(torch.float64)
        rewards = batch["rewards"].to(torch.float64)
        sampler = batch["rollout_logprobs"]
        with torch.no_grad():
            old = _logprobs(model, tokens, variant.temperature)
            ref = _logprobs(reference, tokens, variant.temperature) if g["kl_coef"] > 0 \
                else None
        out.logprobs.append(old.clone())
        normalize = g.get("advantage", "grpo") == "grpo" and g.get("normalize_std", True)
        keep = ~_uniform_rows(rewards) if g.get("drop_uniform_groups") else \
            torch.ones(len(rewards), dtype=torch.bool)
        mask = mask * keep[:, None]
        if sampler is not None:
            valid = mask > 0
            out.parity.append(float((old - sampler.to(torch.float64)).abs()[valid].mean()))
        if g.get("kl_in_reward") and ref is not None:
            kl = torch.where(mask > 0, _kl(old, ref, g["kl_estimator"]), torch.zeros_like(old))
            rewards = rewards - g["kl_coef"] * kl.sum(1)
        adv = _advantages(rewards, normalize)
        kl_sum, kl_tokens = 0.0, 0
        rows = len(rewards) // minibatches
        for _ in range(epochs):
            for m in range(minibatches):
                update += 1
                sl = slice(m * rows, (m + 1) * rows)
                lr = lr_at(update, total, t)
                out.lrs.append(lr)
                if not bool((mask[sl].sum(1) > 0).any()):
                    out.skipped.append(True)
                    out.losses.append(0.0)
                    out.loss_scales.append(0.0)
                    continue
                out.skipped.append(False)
                model.zero_grad()
                logp = _logprobs(model, tokens[sl], variant.temperature)
                loss, scale = _loss(logp, old[sl], None if ref is None else ref[sl], adv[sl],
                                    mask[sl], None if sampler is None else
                                    sampler[sl].to(torch.float64), g)
                loss.backward()
                if ref is not None:
                    valid = mask[sl] > 0
                    kl_sum += float(_kl(logp.detach(), ref[sl], g["kl_estimator"])[valid].sum())
                    kl_tokens += int(valid.sum())
                out.losses.append(float(loss))
                out.loss_scales.append(scale)
                _clip_and_adam(params, moments, adam_steps + 1, lr, t)
                adam_steps += 1
                counts.apply_bias_update(bias_update_rate)
        if ref is not None:
            out.kl_ref.append(kl_sum / max(kl_tokens, 1))
    out.state = _saved_state(model)
    return out


def _saved_state(model: Any) -> dict[str, torch.Tensor]:
    """The weights under the names a saved checkpoint uses (transformers keeps MoE experts
    fused in memory but writes one tensor per expert)."""
    import tempfile

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        state: dict[str, torch.Tensor] = {}
        for f in sorted(Path(directory).glob("*.safetensors")):
            state.update(load_file(f))
    return state


def _clip_and_adam(params: list[tuple[str, torch.Tensor]],
                   moments: dict[str, tuple[torch.Tensor, torch.Tensor]], step: int, lr: float,
                   t: dict[str, Any]) -> None:
    """Global-norm clipping (coefficient clip / (norm + 1e-6) when below 1), then Adam
    with bias correction (no weight decay)."""
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in params}
    norm = math.sqrt(sum(float((gr * gr).sum()) for gr in grads.values()))
    coeff = t["grad_clip"] / (norm + 1e-6)
    b1, b2, eps = t["adam_beta1"], t["adam_beta2"], t["adam_eps"]
    with torch.no_grad():
        for n, p in params:
            gr = grads[n] * coeff if coeff < 1 else grads[n]
            m, v = moments[n]
            m.mul_(b1).add_(gr, alpha=1 - b1)
            v.mul_(b2).addcmul_(gr, gr, value=1 - b2)
            m_hat = m / (1 - b1 ** step)
            v_hat = v / (1 - b2 ** step)
            p.sub_(lr * m_hat / (v_hat.sqrt() + eps))
