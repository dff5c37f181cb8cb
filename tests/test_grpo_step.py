"""The whole GRPO step, checked against an independent reference at several layouts.

For a tiny dense model (Qwen2: q/k/v biases, tied embeddings) and a tiny DeepSeek-V3 (MLA,
routed + shared experts with aux-loss-free bias routing, MTP), saved as Hugging Face
checkpoints and converted, every variant of ``tests/grpo_reference.py`` (R1's clip 10 with
``seq-mean-token-mean`` and minibatches, Dr. GRPO, GSPO, dual clip, truncated importance
sampling with the sampler's log-probs, ``drop_uniform_groups`` with a skipped update,
several minibatches and epochs, temperature != 1, KL in the reward, packed batches, groups
straddling DP ranks) runs through megatron's distributed step in worker processes
(``tests/workers/grpo_variants.py``) at multi-rank layouts, TP/SP/EP/DP and PP x CP
included, and is compared with the same step computed by ``transformers`` and plain
PyTorch in float64. The single-process megatron run is also compared with each layout
(an equivalence check of the same code).

Tolerances, from the arithmetic of a float32 step against a float64 one:

* per-token log-probabilities: 1e-5 x max |log p| (a log-softmax over 256 logits);
* each update's loss (before it): 1e-5 x the same aggregation of |per-token terms| (the
  scale a rounding error of the sum is relative to: on-policy GRPO losses cancel to ~0);
* weights: max |w - w_ref| <= 1e-5 x max |w_ref| per tensor; and, stricter, the update
  ``delta = w_final - w_initial`` per tensor: max |delta - delta_ref| <= 1e-5 x
  max |delta_ref| + sum over updates of lr_k * (4 eps32 * ||g_k||) / adam_eps. The floor
  is Adam's: its update ``lr * m / (sqrt(v) + eps)`` has derivative up to ``lr / eps``
  in a gradient element near 0, and float32 gradients are only known to a few ulps of the
  gradient's overall scale (its global norm ||g_k|| after clipping): elements that cancel
  to almost nothing (norm weights summed over every token) carry a relative error of
  1e-3 and more, which Adam passes on at ``lr / eps``;
* the KL statistic: exactly 0 on a first step of one update (the reference is the policy:
  the same forward pass, the same bits); otherwise ``|kl - kl_ref| <= dx * sqrt(2 kl) + 1e-5 kl``
  with dx = 4 ulp(max |log p|): k3's sensitivity to a token's log-ratio x is
  1 - exp(-x) ~ x, so a rounding dx of the log-ratios moves the mean by at most
  dx * mean|x| <= dx * sqrt(2 kl). Near kl -> 0 no relative tolerance can hold.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed import ROOT, run_torchrun
from tests.grpo_reference import VARIANTS, ReferenceResult, Variant, reference_run

WORKER = ROOT / "tests" / "workers" / "grpo_variants.py"
REL = 1e-5
EPS32 = torch.finfo(torch.float32).eps
HF_NAMES = {"dense": "qwen2", "deepseek_v3": "deepseek_v3"}

# (model, (tp, pp, ep, cp), world size, variants); sequence parallelism on for MoE + TP.
# Every variant runs at one multi-rank layout at least; the sequence-level ones (and the
# KL in the reward) also under context parallelism, where sequences are split.
RUNS = [
    # TP x DP 2: "tis" has a group on both DP ranks.
    ("dense", (2, 1, 1, 1), 4, ("token_mean", "dr_grpo", "tis", "temperature",
                                "kl_in_reward", "packed")),
    # PP x CP ("tis": the sampler's log-probs, and their parity metric, split over CP)
    ("dense", (1, 2, 1, 2), 4, ("token_mean", "r1", "gspo", "kl_in_reward", "tis")),
    # TP + SP x EP: the schedule variants, with expert-bias routing.
    ("deepseek_v3", (2, 1, 2, 1), 2, ("token_mean", "r1", "gspo", "minibatch_epochs",
                                      "drop_uniform")),
    ("deepseek_v3", (1, 2, 2, 2), 4, ("token_mean", "r1", "gspo")),  # PP x EP x CP
]
assert {v for *_, variants in RUNS for v in variants} == set(VARIANTS)
SINGLE = ("token_mean", "r1")  # also run in one process, for the equivalence check


def _load_hf_state(directory: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        state.update(load_file(f))
    return state


class Model:
    """A tiny HF checkpoint, its megatron conversion, and reference results per variant."""

    def __init__(self, name: str, root: Path) -> None:
        from r1mega.convert.hf_to_megatron import convert_hf_to_megatron
        from tests.hf_models import save_tiny_hf_model

        self.name, self.root = name, root
        self.hf_dir, self.megatron_dir = root / "hf", root / "megatron"
        save_tiny_hf_model(HF_NAMES[name], self.hf_dir)
        convert_hf_to_megatron(self.hf_dir, self.megatron_dir)
        self.initial = _load_hf_state(self.hf_dir)
        self._references: dict[str, ReferenceResult] = {}

    def reference(self, variant: str) -> ReferenceResult:
        if variant not in self._references:
            import transformers

            hf = transformers.AutoModelForCausalLM.from_pretrained(
                self.hf_dir, dtype=torch.float64, experts_implementation="eager")
            self._references[variant] = reference_run(hf, VARIANTS[variant])
        return self._references[variant]

    def run(self, layout: tuple[int, int, int, int], world: int, variants: tuple[str, ...],
            out: Path) -> dict[str, dict[str, Any]]:
        """Run the worker; returns per variant its record and final weights (HF names)."""
        from r1mega.convert.megatron_to_hf import convert_megatron_to_hf

        out.mkdir(parents=True)
        spec = {"hf_config": str(self.hf_dir), "initial": str(self.megatron_dir),
                "layout": list(layout), "out": str(out), "variants": list(variants),
                "edge_cases": world == 1}
        (out / "spec.json").write_text(json.dumps(spec))
        run_torchrun(world, WORKER, out / "spec.json", timeout=900)
        results: dict[str, dict[str, Any]] = {}
        if world == 1:
            results["edge_cases"] = json.loads((out / "edge_cases.json").read_text())
        for v in variants:
            convert_megatron_to_hf(out / v, out / f"{v}-hf", hf_config=self.hf_dir)
            results[v] = {"record": json.loads((out / f"{v}.json").read_text()),
                          "state": _load_hf_state(out / f"{v}-hf")}
        return results


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Model]:
    return {name: Model(name, tmp_path_factory.mktemp(f"grpo_{name}")) for name in HF_NAMES}


@pytest.fixture(scope="module")
def single_process(models: dict[str, Model], tmp_path_factory: pytest.TempPathFactory
                   ) -> dict[str, dict[str, dict[str, Any]]]:
    """The single-process megatron runs of :data:`SINGLE` (one worker per model)."""
    return {name: model.run((1, 1, 1, 1), 1, SINGLE,
                            tmp_path_factory.mktemp(f"grpo_single_{name}") / "run")
            for name, model in models.items()}


def kl_tolerance(kl: float, max_abs_logp: float) -> float:
    """See the module docstring: a rounding dx of the log-ratios moves k3's mean by at
    most dx * sqrt(2 kl)."""
    ulp = 2.0 ** (math.floor(math.log2(max_abs_logp)) - 23)
    return 4 * ulp * math.sqrt(2 * max(kl, 0.0)) + REL * abs(kl)


def _check_weights(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                   initial: dict[str, torch.Tensor], floor: float, what: str) -> list[str]:
    problems = []
    for key in initial:
        if key not in expected:
            continue  # DeepSeek-V3's MTP layer (not in the transformers model)
        got, want, start = (t.to(torch.float64) for t in (state[key], expected[key],
                                                          initial[key]))
        rel = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
        if rel > REL:
            problems.append(f"{what}: {key}: max |w - w_ref| / max |w_ref| = {rel:.2e}")
        delta, delta_ref = got - start, want - start
        err = float((delta - delta_ref).abs().max())
        bound = REL * float(delta_ref.abs().max()) + floor
        if err > bound:
            problems.append(f"{what}: {key}: update differs by {err:.2e} > {bound:.2e} "
                            f"(max |update| {float(delta_ref.abs().max()):.2e})")
    return problems


def compare_with_reference(variant: Variant, result: dict[str, Any], ref: ReferenceResult,
                           initial: dict[str, torch.Tensor]) -> list[str]:
    """Every difference between a megatron run of a variant and the reference beyond the
    tolerances of the module docstring."""
    problems = []
    steps = result["record"]["steps"]
    updates = [u for s in steps for u in s["updates"]]
    if [bool(u["skipped"]) for u in updates] != ref.skipped:
        problems.append(f"skipped updates {[u['skipped'] for u in updates]} != {ref.skipped}")
    for k, (u, loss, scale, lr) in enumerate(zip(updates, ref.losses, ref.loss_scales,
                                                  ref.lrs, strict=True)):
        if abs(u["lr"] - lr) > 1e-12 * lr:
            problems.append(f"update {k + 1}: lr {u['lr']} != {lr}")
        if abs(u["loss"] - loss) > REL * max(abs(loss), scale):
            problems.append(f"update {k + 1}: loss {u['loss']:.10g} != {loss:.10g} "
                            f"(scale {scale:.3g})")
    for i, (step, ref_logp) in enumerate(zip(steps, ref.logprobs, strict=True)):
        logp = torch.tensor(step["logprobs"], dtype=torch.float64)
        bound = REL * float(ref_logp.abs().max())
        err = float((logp - ref_logp).abs().max())
        if err > bound:
            problems.append(f"step {i + 1}: log-probs differ by {err:.2e} > {bound:.2e}")
        if ref.parity:  # rollout-vs-trainer gap: each token's log-prob within the bound
            gap, want = step["metrics"]["rollout/logprob_diff_mean"], ref.parity[i]
            if abs(gap - want) > bound:
                problems.append(f"step {i + 1}: rollout parity {gap:.10g} != {want:.10g}")
        if ref.kl_ref:
            kl, want = step["metrics"]["kl_ref"], ref.kl_ref[i]
            single_update = variant.updates == variant.steps
            if i == 0 and single_update and (kl != 0.0 or want != 0.0):
                problems.append(f"step 1: KL to the reference {kl} (reference {want}), not 0")
            tol = kl_tolerance(want, float(ref_logp.abs().max()))
            if abs(kl - want) > tol:
                problems.append(f"step {i + 1}: KL {kl:.10g} != {want:.10g} (tol {tol:.2e})")
    eps = variant.train_config()["adam_eps"]
    clip = variant.train_config()["grad_clip"]
    floor = sum(lr * 4 * EPS32 * min(u["grad_norm"], clip) / eps
                for u, lr in zip(updates, ref.lrs, strict=True) if not u["skipped"])
    problems += _check_weights(result["state"], ref.state, initial, floor, "weights")
    problems += _check_mtp(result["state"], ref.state, initial)
    return problems


def _check_mtp(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
               initial: dict[str, torch.Tensor]) -> list[str]:
    """DeepSeek-V3's MTP layer is not in the transformers model. RL does not train it (its
    loss mask is zero): its weights stay, except its router's expert bias (token
    statistics) and its copies of the embedding and output head, which megatron shares
    with the main model."""
    problems = []
    shared = {"embed_tokens.weight": "model.embed_tokens.weight",
              "shared_head.head.weight": "lm_head.weight"}
    for key, start in initial.items():
        if key in expected or key.endswith("e_score_correction_bias"):
            continue
        main = next((m for suffix, m in shared.items() if key.endswith(suffix)), None)
        if main is not None:
            if not torch.equal(state[key], state[main]):
                problems.append(f"{key} is not the main model's {main}")
        elif not torch.equal(state[key], start):
            problems.append(f"{key} (not trained by RL) changed")
    return problems


def compare_runs(result: dict[str, Any], baseline: dict[str, Any],
                 initial: dict[str, torch.Tensor], variant: str, ref: ReferenceResult
                 ) -> list[str]:
    """A layout against the single-process run of the same code: the same tolerances
    (the loss scales are the reference's)."""
    problems = []
    steps, base_steps = result["record"]["steps"], baseline["record"]["steps"]
    mine = [u for s in steps for u in s["updates"]]
    base_updates = [u for s in base_steps for u in s["updates"]]
    for k, (u, b, scale) in enumerate(zip(mine, base_updates, ref.loss_scales, strict=True)):
        if abs(u["loss"] - b["loss"]) > REL * max(abs(b["loss"]), scale):
            problems.append(f"update {k + 1}: loss {u['loss']} != {b['loss']} (one process)")
    for i, (step, base) in enumerate(zip(steps, base_steps, strict=True)):
        logp, base_logp = (torch.tensor(s["logprobs"]) for s in (step, base))
        if float((logp - base_logp).abs().max()) > REL * float(base_logp.abs().max()):
            problems.append(f"step {i + 1}: log-probs differ from one process")
        kl, want = step["metrics"]["kl_ref"], base["metrics"]["kl_ref"]
        if abs(kl - want) > kl_tolerance(want, float(base_logp.abs().max())):
            problems.append(f"step {i + 1}: KL {kl} != {want} (one process)")
    updates = [u for s in base_steps for u in s["updates"]]
    cfg = VARIANTS[variant].train_config()
    floor = sum(u["lr"] * 4 * EPS32 * min(u["grad_norm"], cfg["grad_clip"]) / cfg["adam_eps"]
                for u in updates if not u["skipped"])
    return problems + _check_weights(result["state"], baseline["state"], initial, floor,
                                     "vs one process")


@pytest.mark.parametrize(("model", "layout", "world", "variants"), RUNS,
                         ids=[f"{m}-tp{t}pp{p}ep{e}cp{c}" for m, (t, p, e, c), _, _ in RUNS])
def test_grpo_step_matches_reference(models: dict[str, Model],
                                     single_process: dict[str, dict[str, dict[str, Any]]],
                                     tmp_path: Path, model: str, layout: tuple[int, ...],
                                     world: int, variants: tuple[str, ...]) -> None:
    m = models[model]
    results = m.run(layout, world, variants, tmp_path / "run")
    problems = []
    for v in variants:
        problems += [f"{v}: {p}" for p in compare_with_reference(
            VARIANTS[v], results[v], m.reference(v), m.initial)]
        if v in single_process[model]:
            problems += [f"{v}: {p}" for p in compare_runs(results[v], single_process[model][v],
                                                           m.initial, v, m.reference(v))]
    assert not problems, "\n".join(problems)
    # The checks can fail: the policy moved, the KL term was live, clipping happened.
    record = results["token_mean"]["record"]
    assert record["steps"][1]["metrics"]["kl_ref"] > 0
    assert not torch.equal(results["token_mean"]["state"]["model.norm.weight"],
                           m.initial["model.norm.weight"])
    if "minibatch_epochs" in results:
        metrics = results["minibatch_epochs"]["record"]["steps"][0]["metrics"]
        assert metrics["clip_frac"] > 0 and metrics["updates"] == 4
    if "drop_uniform" in results:
        metrics = results["drop_uniform"]["record"]["steps"][0]["metrics"]
        assert metrics["skipped_updates"] == 1 and metrics["updates"] == 1


def test_single_process_matches_reference(models: dict[str, Model],
                                          single_process: dict[str, dict[str, dict[str, Any]]]
                                          ) -> None:
    problems = []
    for name, model in models.items():
        for v in SINGLE:
            problems += [f"{name} {v}: {p}" for p in compare_with_reference(
                VARIANTS[v], single_process[name][v], model.reference(v), model.initial)]
    assert not problems, "\n".join(problems)


def test_vocab_parallel_logprobs_and_entropy_edge_cases(
        single_process: dict[str, dict[str, dict[str, Any]]]) -> None:
    """The caller's logits survive a batch or sequence dimension of 1 (megatron's kernel
    works in place), and -inf logits give a finite entropy (checked in the worker)."""
    checks = single_process["dense"]["edge_cases"]
    assert checks and all(checks.values()), checks


def test_reference_detects_a_wrong_step(models: dict[str, Model],
                                        single_process: dict[str, dict[str, dict[str, Any]]]
                                        ) -> None:
    """The comparison is not vacuous: the step with twice the KL coefficient (a term of
    1e-4 in a loss of 0.09 on the second step) is told apart from the megatron run."""
    import transformers

    model = models["dense"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(model.hf_dir, dtype=torch.float64)
    variant = VARIANTS["token_mean"]
    wrong = reference_run(hf, replace(variant, grpo={"kl_coef": 0.1}))
    problems = compare_with_reference(variant, single_process["dense"]["token_mean"], wrong,
                                      model.initial)
    assert any("step 2" in p or "update 2" in p for p in problems), problems
