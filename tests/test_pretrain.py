"""The tiny base-model warm start (r1mega.pretrain): its training text is what the rewards
accept, it learns, it is deterministic, it caches, it loads at the RL job's layout.

One short pretraining run (a few steps of the real recipe through tools/pretrain_tiny.py,
in a subprocess so megatron's global state stays out of pytest) feeds most checks; they
assert what the recipe does, not how good the 600-step model is (the tool's docstring
records that). The layout check runs this file as a 2-rank torchrun worker that builds
the model at the tiny config's PP=2 training layout.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny_cpu.yaml"
TASK = "builtin:add_small"
# The task, and a response budget that holds a formatted answer (45 bytes), whatever the
# shipped config says.
OVERRIDES = [f"data.train_path={TASK}", "rollout.max_new_tokens=48"]
# A handful of steps, every phase of the curriculum included (short, then full template).
STEPS = 6
SMALL = {"seed": 7, "short_batch_size": 4, "batch_size": 2, "full_frac": 0.5}
ARGS = ["--steps", str(STEPS), "--seed", "7", "--short-batch-size", "4", "--batch-size", "2",
        "--full-frac", "0.5"]


def _pretrain_tool(out: Path, *extra: str) -> str:
    """Run tools/pretrain_tiny.py with the test's settings; its stdout."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "pretrain_tiny.py"), str(TINY), *OVERRIDES,
         "--out", str(out), *ARGS, *extra],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return proc.stdout


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny_base")
    _pretrain_tool(out)
    return out


def _meta(out: Path) -> dict[str, Any]:
    return json.loads((out / "meta.json").read_text())


def _tokenizer() -> Any:
    from r1mega.config import load_config
    from r1mega.data.tokenizers import build_tokenizer

    return build_tokenizer(load_config(TINY, OVERRIDES).tokenizer)


# ----------------------------------------------------------------------------- text


def test_training_text_is_what_the_rewards_score() -> None:
    from r1mega.data.tasks import builtin_dataset
    from r1mega.pretrain import completion_text, formatted_completion
    from r1mega.rewards import format_ok
    from r1mega.rewards.extract import last_answer_block

    assert format_ok(formatted_completion("3 + 4", 7))
    assert last_answer_block(formatted_completion("3 + 4", 7)).strip() == "7"
    examples = builtin_dataset(TASK, "train", 0, 400)
    rng = random.Random(0)
    texts = [completion_text(ex, rng, correct_frac=0.6, format_frac=0.6) for ex in examples]
    formatted = [format_ok(t) for t in texts]
    # the imperfect base-model text: some formatted, some not, at about the asked rate
    assert 0.5 < sum(formatted) / len(texts) < 0.7
    perfect = [completion_text(ex, rng, correct_frac=1.0, format_frac=1.0) for ex in examples]
    assert all(t == formatted_completion(ex.metadata["expression"], int(ex.answer))
               for ex, t in zip(examples, perfect, strict=True))


def test_batches_weight_exactly_the_completion_tokens() -> None:
    from r1mega.pretrain import encode_example, lm_batch

    tok = _tokenizer()
    rows = [encode_example(tok, "User: What is 3 + 4?. Assistant:",
                           " <think> 3 + 4 </think> <answer> 7 </answer>", slot_weight=4.0),
            encode_example(tok, "Q: 1 + 1?", " <answer> 2 </answer>", slot_weight=4.0)]
    batch = lm_batch(rows, tok.pad_id)
    for i, (_, completion, weights) in enumerate(rows):
        mask = batch["loss_mask"][i]
        labels = batch["labels"][i][mask > 0].tolist()
        assert labels == completion and labels[-1] == tok.eos_id  # context and padding: 0
        assert mask[mask > 0].tolist() == weights
        # up-weighted: the first token of every number the completion writes
        heavy = tok.decode([t for t, w in zip(completion, weights, strict=True) if w > 1])
        assert heavy == ("347" if i == 0 else "2")


def test_full_template_rows_carry_the_task_weight() -> None:
    """The final phase's full-template rows are the same text as an unweighted draw, their
    loss mask scaled by ``full_weight``: count_on weights them 4x (half of a step's loss
    against 16 short rows), add_small keeps 1; a weight that would train on nothing is
    refused."""
    from r1mega.config import load_config
    from r1mega.data.tasks import builtin_dataset
    from r1mega.pretrain import PretrainSettings, full_template_batch, make_settings, sample_batch

    tok = _tokenizer()
    cfg = load_config(ROOT / "configs" / "r1_zero_tiny_cpu.yaml")
    settings = make_settings(cfg, 10, None, None, {})
    assert (settings.full_weight, settings.worked_frac) == (4.0, 0.75)
    assert make_settings(load_config(TINY, OVERRIDES), 10, None, None, {}).full_weight == 1.0
    examples = builtin_dataset(settings.task, "train", 1)
    weighted = full_template_batch(tok, cfg.data.template, examples, random.Random(3),
                                   settings)
    plain = sample_batch(tok, cfg.data.template, examples, random.Random(3),
                         settings.batch_size, False, settings)
    assert weighted["tokens"].shape[0] == settings.batch_size
    assert all(weighted[key].equal(plain[key]) for key in ("tokens", "labels"))
    assert weighted["loss_mask"].equal(plain["loss_mask"] * 4.0)
    assert tok.decode(weighted["tokens"][0].tolist()).startswith("A conversation between")
    with pytest.raises(ValueError, match="full_weight"):
        PretrainSettings(task=settings.task, full_weight=0.0)


def test_two_style_rows_fit_the_worked_prior() -> None:
    """count_on rows: half worked, half direct, the same context; every digit of a
    number is up-weighted; on worked rows the first worked token (``:`` where a direct
    answer writes `` = ``) carries the style weight, relative to what the direct rows
    have there, and that weight makes the fitted probability of the worked style the
    prior: the expected loss gradient vanishes at p = prior."""
    from r1mega.data.count_on import direct_text, worked_text
    from r1mega.data.tasks import builtin_dataset
    from r1mega.pretrain import PretrainSettings, style_weight, two_style_row

    tok = _tokenizer()
    settings = PretrainSettings(task="builtin:count_on", worked_frac=0.5, worked_prior=0.3)
    ex = builtin_dataset("builtin:count_on", "train", 1)[0]
    a, b = ex.metadata["a"], ex.metadata["b"]
    rng = random.Random(0)
    rows = [two_style_row(tok, "ctx", ex, rng, settings, weighted=True) for _ in range(400)]
    worked = [r for r in rows if tok.decode(r[1][:-1]) == worked_text(a, b)]
    direct = [r for r in rows if r not in worked]
    assert 150 < len(worked) < 250 and all(r[0] == tok.encode("ctx") for r in rows)
    split = len(tok.encode(f" <think> {a} + {b}"))
    assert tok.decode([worked[0][1][split]]) == ":"
    assert all(tok.decode(r[1][:split]) == f" <think> {a} + {b}" for r in direct)
    w = style_weight(0.5, 0.3)
    assert worked[0][2][split] == pytest.approx(direct[0][2][split] * w)
    # weighted cross-entropy over the two choices: f w (1 - p) = (1 - f) p at p = prior
    p = 0.3
    assert 0.5 * w * (1 - p) == pytest.approx(0.5 * p)
    # up-weighted, since a weight depends on the text before a token only: the first
    # digit of a number that starts after a slot (the operands, the running numbers, the
    # answer; not the units-left counters, which follow a plain space), and every token
    # that follows a digit
    text = worked_text(a, b)
    expected = set()
    for match in re.finditer(r"\d+", text):
        expected |= set(range(match.start() + 1, match.end() + 1))
        if text[:match.start()].endswith(("<think> ", "+ ", ": ", ", ", "<answer> ")):
            expected.add(match.start())
    heavy = {i for i, weight in enumerate(worked[0][2]) if weight > 1} - {split}
    assert heavy == expected - {split}, text
    assert direct_text(a, b).startswith(f" <think> {a} + {b} = ")


def test_short_response_budget_is_reported() -> None:
    from r1mega.config import load_config
    from r1mega.pretrain import response_budget_warning

    short = load_config(TINY, [f"data.train_path={TASK}", "rollout.max_new_tokens=32"])
    assert "rollout.max_new_tokens=32" in response_budget_warning(short, TASK)
    assert "45 tokens" in response_budget_warning(short, TASK)
    assert response_budget_warning(load_config(TINY, OVERRIDES), TASK) is None
    # a two-style task needs room for its longest worked answer (b = 9: 106 tokens)
    r1_zero = ROOT / "configs" / "r1_zero_tiny_cpu.yaml"
    assert response_budget_warning(load_config(r1_zero), "builtin:count_on") is None
    tight = load_config(r1_zero, ["rollout.max_new_tokens=104"])
    assert "106 tokens" in response_budget_warning(tight, "builtin:count_on")


# ----------------------------------------------------------------------------- training


def test_a_new_schema_field_at_its_default_keeps_cache_keys() -> None:
    from dataclasses import dataclass

    from omegaconf import OmegaConf

    from r1mega.pretrain import non_default_fields

    @dataclass
    class Before:
        width: int = 8

    @dataclass
    class After:  # the schema gained a field whose default keeps the old behaviour
        width: int = 8
        head: str = "lm"

    def section(schema: type, **values: Any) -> Any:
        return OmegaConf.merge(OmegaConf.structured(schema), values)

    assert non_default_fields(section(Before, width=16)) == {"width": 16}
    assert non_default_fields(section(After, width=16)) == {"width": 16}
    assert non_default_fields(section(After, head="scalar")) == {"head": "scalar"}


def test_pretraining_lowers_heldout_completion_loss(pretrained: Path) -> None:
    meta = _meta(pretrained)
    # Held-out problems (the eval pairs), same text generator; the untrained model is near
    # ln 512 = 6.24. A handful of steps must already learn much of the format.
    assert meta["initial_eval_loss"] > 5.0
    assert meta["final_eval_loss"] < meta["initial_eval_loss"] - 1.0
    assert meta["settings"]["task"] == TASK
    assert meta["settings"]["steps"] == STEPS and meta["settings"]["seed"] == 7
    assert (pretrained / "weights" / "r1mega_config.yaml").is_file()
    assert not (pretrained / "weights.partial").exists()


def test_same_settings_train_the_same_model(pretrained: Path, tmp_path: Path) -> None:
    _pretrain_tool(tmp_path)
    again, first = _meta(tmp_path), _meta(pretrained)
    assert again["cache_key"] == first["cache_key"]
    for loss in ("initial_eval_loss", "final_eval_loss", "final_train_loss"):
        assert again[loss] == first[loss], loss


def test_same_settings_reuse_the_cache(pretrained: Path, tmp_path: Path) -> None:
    from r1mega.config import load_config
    from r1mega.pretrain import (
        PretrainSettings,
        cache_key,
        cached_result,
        pretrain_base,
        single_process_config,
    )

    before = {p: p.stat().st_mtime_ns for p in (pretrained / "meta.json",
                                                pretrained / "weights")}
    logs: list[str] = []
    cfg = load_config(TINY, OVERRIDES)
    result = pretrain_base(cfg, pretrained, STEPS, log=logs.append, **SMALL)
    assert result.reused and logs == [f"[pretrain] reusing {pretrained / 'weights'} "
                                      f"(cache key {result.cache_key})"]
    assert result.final_eval_loss == _meta(pretrained)["final_eval_loss"]
    assert {p: p.stat().st_mtime_ns for p in before} == before
    # Anything that changes the weights is a different cache entry...
    single = single_process_config(cfg)
    base = PretrainSettings(task=TASK, steps=STEPS, seed=7)
    assert cache_key(single, base) != cache_key(single, PretrainSettings(
        task=TASK, steps=STEPS, seed=8))
    bigger = single_process_config(load_config(TINY, [*OVERRIDES, "model.hidden_size=128"]))
    assert cache_key(single, base) != cache_key(bigger, base)
    # ...while the RL job's layout and sampling settings are not part of the key.
    other_job = load_config(TINY, [*OVERRIDES, "train_layout.pp=1", "rollout.max_new_tokens=64"])
    assert cache_key(single_process_config(other_job), base) == cache_key(single, base)
    # Weights without their meta.json (a run killed before the end) are not a cache entry.
    (tmp_path / "weights").mkdir()
    assert cached_result(tmp_path, result.cache_key) is None
    assert cached_result(pretrained, "another key") is None


def test_tool_reuses_the_cache_and_samples_the_model(pretrained: Path) -> None:
    # A second run of the command trains nothing; --eval samples the stored weights with
    # the config's response budget (8 tokens here, too short: the tool says so).
    mtime = (pretrained / "meta.json").stat().st_mtime_ns
    out = _pretrain_tool(pretrained, "--eval", "2", "rollout.max_new_tokens=8")
    assert "[pretrain] reusing" in out and "[pretrain] step" not in out
    assert "warning: rollout.max_new_tokens=8 is shorter than a formatted answer" in out
    assert (pretrained / "meta.json").stat().st_mtime_ns == mtime
    report = re.findall(r"\[pretrain eval\] (\S+): (\d+) samples \| format ([\d.]+) \| "
                        r"accuracy ([\d.]+)", out)
    assert [(mode, int(n)) for mode, n, _, _ in report] == [("T=1", 8), ("greedy", 2)]
    assert all(float(f) == 0.0 and float(a) == 0.0 for _, _, f, a in report)


def test_weights_load_at_the_tiny_layout_and_jobs_can_ensure_them(
        pretrained: Path, tmp_path: Path) -> None:
    from tests.distributed import run_torchrun

    mtime = (pretrained / "meta.json").stat().st_mtime_ns
    proc = run_torchrun(2, Path(__file__), str(pretrained), str(tmp_path / "new"),
                        timeout=300)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    got = json.loads(line[len("RESULT "):])
    meta = _meta(pretrained)
    # Same weights, same held-out batch, different layout (PP=2): the loss the pretraining
    # process measured, and far below a fresh model's.
    assert got["loaded"] == pytest.approx(meta["final_eval_loss"], rel=1e-4, abs=1e-4)
    assert got["fresh"] > got["loaded"] + 1.0
    # Inside a 2-rank job, pretraining in-process is refused; a cached model is found
    # without retraining; a missing one is trained once (rank 0, in a subprocess) and
    # every rank gets its path.
    assert "already initialized" in got["refused"]
    assert got["cached"] == str(pretrained / "weights")
    assert (pretrained / "meta.json").stat().st_mtime_ns == mtime
    assert got["new"] == [str(tmp_path / "new" / "weights")] * 2
    assert _meta(tmp_path / "new")["settings"]["steps"] == 2


def _layout_worker(out: str, new_out: str) -> None:
    """torchrun worker: the tiny config's training layout (PP=2 on 2 ranks)."""
    import torch.distributed as dist

    from parallel.layout import Layout, init_distributed, initialize_layout
    from parallel.platform import manual_seed
    from r1mega.checkpointing.model_io import load_model
    from r1mega.config import load_config
    from r1mega.pretrain import (
        PretrainSettings,
        completion_loss,
        ensure_base_model,
        heldout_batch,
        pretrain_base,
    )
    from r1mega.training.policy import build_policy

    env = init_distributed()
    cfg = load_config(TINY, OVERRIDES, world_size=env.world_size)
    layout = Layout.from_config(cfg.train_layout, env.world_size)
    assert layout.pp == 2
    initialize_layout(layout)
    manual_seed(cfg.train.seed)
    settings = PretrainSettings(**json.loads((Path(out) / "meta.json").read_text())["settings"])
    batch = heldout_batch(cfg, settings)
    policy = build_policy(cfg.model, cfg.train_layout, cfg.precision)
    fresh = completion_loss(policy, batch)
    load_model(policy.chunks, str(Path(out) / "weights"))
    loaded = completion_loss(policy, batch)
    try:
        pretrain_base(cfg, new_out + "_refused", 1, force=True)
        refused = ""
    except RuntimeError as err:
        refused = str(err)
    cached = ensure_base_model(cfg, out, STEPS, **SMALL)
    new = ensure_base_model(cfg, new_out, 2, seed=7, short_batch_size=2, batch_size=1,
                            full_frac=0.5)
    paths: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(paths, new)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"fresh": fresh, "loaded": loaded, "refused": refused,
                                      "cached": cached, "new": paths}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _layout_worker(sys.argv[1], sys.argv[2])
