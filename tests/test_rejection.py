"""Rejection sampling (`r1mega sample`): filters, deduplication, statistics, crash-safe
resuming, and the reward-model path for general prompts.

The end-to-end runs use the random tiny DeepSeek-V3 of configs/sample_tiny_cpu.yaml on 2
processes: its responses are random bytes, which the config's language reward and
readability filter sometimes accept and sometimes reject, so every run both keeps and
drops samples. Every row written is re-checked here against the filters on its own.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from r1mega.config import ConfigError, load_config
from r1mega.config.schema import R1MegaConfig, ReadabilityConfig
from r1mega.data.prompts import PromptExample
from r1mega.data.readability import rejection_reason
from r1mega.rejection.faults import KILL_ENV, TORN_ROW
from r1mega.rejection.filtering import (
    DROP_REASONS,
    DUPLICATE,
    LOW_REWARD,
    LOW_REWARD_MODEL_SCORE,
    OVER_CAP,
    REWARD_MODEL,
    RULES,
    Candidate,
    FilterSettings,
    select,
)
from r1mega.rejection.judge import judge_batch
from r1mega.rejection.prompts import SamplingPrompt, load_prompts, prompt_sources
from r1mega.rejection.scoring import BatchScorer, check_reward_model
from r1mega.rejection.stats import compute_stats
from r1mega.rejection.store import PromptOutcome, SampleStore, StoreError
from r1mega.rewards import RewardFunction, RewardInput
from r1mega.sft.data import read_rows
from tests.distributed import ROOT

CONFIG = "configs/sample_tiny_cpu.yaml"
K = 4  # sample.samples_per_prompt in CONFIG

# ---------------------------------------------------------------------- filtering


def _settings(**kw: Any) -> FilterSettings:
    readability = ReadabilityConfig(require_think=True, require_summary=True, language="en",
                                    min_language_fraction=0.95, max_response_tokens=50)
    base = dict(min_reward=1.0, reward_model_threshold=0.25, readability=readability,
                dedupe=True, max_kept_per_prompt=2)
    return FilterSettings(**{**base, **kw})


GOOD_A = "<think>add three and four</think> The sum is seven."
GOOD_B = "<think>three plus four</think> So it is seven."
GOOD_C = "<think>count on from three</think> Seven."


def test_select_gives_every_sample_exactly_one_reason_in_order() -> None:
    candidates = [
        Candidate(GOOD_A, 20, 1.0),                               # kept
        Candidate(GOOD_B, 20, 0.5),                               # reward below 1.0
        Candidate("The sum is seven.", 10, 1.0),                  # no think block
        Candidate("<think>three four</think>", 10, 1.0),          # nothing after it
        Candidate("<think>añadir números</think> fin", 10, 1.0),  # mixed language
        Candidate(GOOD_B, 60, 1.0),                               # over 50 tokens
        Candidate("   ", 1, 1.0),                                 # empty
        Candidate(GOOD_A, 20, 1.0),                               # same text as a kept one
        Candidate("<think>no</think> bad", 5, math.nan),          # a failed reward
        Candidate(GOOD_B, 20, 1.0),                               # kept (second)
        Candidate(GOOD_C, 20, 1.0),                               # cap of 2 reached
        Candidate(GOOD_A, 20, 0.0),                               # low reward before dup
    ]
    assert select(candidates, RULES, _settings()) == [
        None, LOW_REWARD, "no_think", "no_summary", "mixed_language", "too_long", "empty",
        DUPLICATE, LOW_REWARD, None, OVER_CAP, LOW_REWARD]


def test_select_thresholds_by_kind_and_cap_without_dedupe() -> None:
    candidates = [Candidate(GOOD_A, 20, 0.3), Candidate(GOOD_A, 20, 0.2),
                  Candidate(GOOD_A, 20, 0.9), Candidate(GOOD_B, 20, 0.9)]
    assert select(candidates, REWARD_MODEL, _settings(dedupe=False)) == [
        None, LOW_REWARD_MODEL_SCORE, None, OVER_CAP]
    assert select(candidates, RULES, _settings(min_reward=0.25, max_kept_per_prompt=None)) == [
        None, LOW_REWARD, DUPLICATE, None]
    with pytest.raises(ValueError, match="unknown reward kind"):
        select(candidates, "judge", _settings())


def _prompt(index: int, kind: str = RULES, source: str = "prompts",
            answer: str | None = "7") -> SamplingPrompt:
    return SamplingPrompt(index, PromptExample(index, f"What is {index} + 7?", answer,
                                               source=f"file.jsonl:{index + 1}"), kind, source)


def test_judge_batch_rows_are_the_kept_samples_and_stats_add_up() -> None:
    prompts = [_prompt(3), _prompt(4)]
    texts = [GOOD_A, GOOD_A, "plain", GOOD_B, GOOD_B, GOOD_C, GOOD_A, "x"]
    tokens = [20, 20, 5, 20, 20, 20, 20, 1]
    scores = [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    records, rows = judge_batch(prompts, texts, tokens, scores, _settings(), per_prompt=4)
    assert [r.outcomes for r in records] == [
        [None, DUPLICATE, "no_think", LOW_REWARD], [None, None, OVER_CAP, "no_think"]]
    assert [(r["prompt_index"], r["response"]) for r in rows] == [
        (3, GOOD_A), (4, GOOD_B), (4, GOOD_C)]
    assert rows[0] == {"prompt": "What is 3 + 7?", "response": GOOD_A, "reward": 1.0,
                       "source": "file.jsonl:4", "prompt_index": 3, "response_tokens": 20}

    stats = compute_stats(records + [PromptOutcome(9, "general", REWARD_MODEL,
                                                   [LOW_REWARD_MODEL_SCORE] * 2, [3, 4],
                                                   [6, 8])], prompts_total=5)
    assert stats["prompts_done"] == 3 and not stats["complete"]
    assert stats["samples_generated"] == 10 == stats["kept"] + stats["dropped_total"]
    assert stats["kept"] == 3 and set(stats["dropped"]) == set(DROP_REASONS)
    assert stats["dropped"] == {**dict.fromkeys(DROP_REASONS, 0), DUPLICATE: 1, "no_think": 2,
                                LOW_REWARD: 1, OVER_CAP: 1, LOW_REWARD_MODEL_SCORE: 2}
    assert stats["kept_per_prompt"]["histogram"] == {"0": 1, "1": 1, "2": 1}
    assert stats["acceptance_rate"] == pytest.approx(0.3)
    assert stats["response_tokens"]["kept"] == {"count": 3, "total": 60, "min": 20,
                                                "max": 20, "mean": 20.0}
    assert stats["response_chars"]["kept"]["total"] == sum(len(r["response"]) for r in rows)
    assert stats["by_source"]["general"] == {
        "kind": REWARD_MODEL, "prompts": 1, "generated": 2, "kept": 0,
        "dropped": {LOW_REWARD_MODEL_SCORE: 2}, "acceptance_rate": 0.0}


# ---------------------------------------------------------------------- the store


def _outcome(index: int, kept: int, dropped: int = 1) -> PromptOutcome:
    outcomes = [None] * kept + [LOW_REWARD] * dropped
    return PromptOutcome(index, "prompts", RULES, outcomes, [5] * len(outcomes),
                         [9] * len(outcomes))


def _row(index: int, j: int) -> dict[str, Any]:
    return {"prompt": f"p{index}", "response": f"r{index}.{j}", "reward": 1.0,
            "source": f"f:{index}", "prompt_index": index, "response_tokens": 5}


def _commit(store: SampleStore, outcomes: list[PromptOutcome]) -> None:
    store.append_rows([_row(o.prompt_index, j) for o in outcomes for j in range(o.kept)])
    store.record_progress(outcomes)


def test_store_repairs_what_a_crash_leaves_and_never_duplicates(tmp_path: Path) -> None:
    store = SampleStore(tmp_path / "out")
    assert store.open({"k": 1}) == {}
    _commit(store, [_outcome(0, 2), _outcome(1, 0)])  # batch 1: committed
    committed = store.dataset_path.read_bytes()
    # Batch 2 killed during its commit: rows written, a torn row, no progress line; and a
    # torn progress line of a batch 3 that never finished.
    store.append_rows([_row(2, 0), _row(3, 0)])
    with open(store.dataset_path, "ab") as f:
        f.write(TORN_ROW)
    with open(store.progress_path, "ab") as f:
        f.write(b'{"prompt_index": 2, "sou')
    done = SampleStore(tmp_path / "out").open({"k": 1})
    assert done == {0: 2, 1: 0}
    assert store.dataset_path.read_bytes() == committed
    assert store.progress_path.read_bytes().endswith(b"\n")
    _commit(store, [_outcome(2, 1), _outcome(3, 1)])  # the re-run of batch 2
    assert SampleStore(tmp_path / "out").open({"k": 1}) == {0: 2, 1: 0, 2: 1, 3: 1}
    assert [r.prompt_index for r in store.progress()] == [0, 1, 2, 3]
    pairs = [(r["prompt_index"], r["response"]) for r in store.read_rows()]
    assert pairs == [(0, "r0.0"), (0, "r0.1"), (2, "r2.0"), (3, "r3.0")]


def test_a_run_that_keeps_nothing_leaves_an_empty_dataset_the_sft_stage_names(
        tmp_path: Path) -> None:
    store = SampleStore(tmp_path / "out")
    store.open({"k": 1})
    _commit(store, [_outcome(0, 0), _outcome(1, 0)])
    assert store.dataset_path.read_bytes() == b""
    assert SampleStore(tmp_path / "out").open({"k": 1}) == {0: 0, 1: 0}
    sft_cfg = OmegaConf.create({"train_path": str(store.dataset_path),
                                "prompt_field": "prompt", "response_field": "response"})
    with pytest.raises(ValueError, match="has no valid rows.*the file has no rows"):
        read_rows(sft_cfg, seed=0)


def test_store_drops_uncommitted_rows_anywhere_and_refuses_inconsistency(tmp_path: Path
                                                                         ) -> None:
    store = SampleStore(tmp_path)
    store.open({"k": 1})
    store.append_rows([_row(0, 0), _row(7, 0), _row(1, 0)])  # 7 never committed
    store.record_progress([_outcome(0, 1), _outcome(1, 1)])
    store.open({"k": 1})
    assert [r["prompt_index"] for r in store.read_rows()] == [0, 1]

    store.record_progress([_outcome(2, 1)])  # progress says a row that is not there
    with pytest.raises(StoreError, match="0 row.* of prompt 2 but progress.jsonl records 1"):
        store.open({"k": 1})


def test_store_refuses_other_settings_and_foreign_directories(tmp_path: Path) -> None:
    SampleStore(tmp_path / "a").open({"samples_per_prompt": 4, "seed": 1})
    with pytest.raises(StoreError, match="samples_per_prompt: was 4, now 8"):
        SampleStore(tmp_path / "a").open({"samples_per_prompt": 8, "seed": 1})
    foreign = tmp_path / "b"
    foreign.mkdir()
    (foreign / "dataset.jsonl").write_text('{"prompt": "mine"}\n')
    with pytest.raises(StoreError, match="not a directory written by r1mega sample"):
        SampleStore(foreign).open({})
    assert (foreign / "dataset.jsonl").read_text() == '{"prompt": "mine"}\n'


# ---------------------------------------------------------------------- reward kinds


class FakeRewardModel:
    """Deterministic stand-in for a reward model: the fraction of 'e' in the response."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[str]]] = []

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        self.calls.append((list(prompts), list(responses)))
        return [r.count("e") / max(len(r), 1) for r in responses]


def _cfg(**sections: Any) -> Any:
    return OmegaConf.merge(OmegaConf.structured(R1MegaConfig), sections)


def test_rule_and_reward_model_prompts_are_scored_and_filtered_by_their_kind() -> None:
    rules = RewardFunction.from_config({"specs": [{"name": "format", "weight": 1.0}]})
    fake = FakeRewardModel()
    formatted = "<think>one</think> <answer>7</answer>"
    rows = [_prompt(0), _prompt(0), _prompt(1, REWARD_MODEL, "general", None),
            _prompt(1, REWARD_MODEL, "general", None)]
    texts = [formatted, "seven", "eeee", "xyz"]
    scores = BatchScorer(rules, fake)(rows, texts)
    rules.close()
    assert scores == [1.0, 0.0, 1.0, 0.0]
    assert fake.calls == [(["What is 1 + 7?"] * 2, ["eeee", "xyz"])]  # raw prompts, RM rows
    # Ranks other than 0 hold no rule rewards but still run the (collective) reward model.
    assert [math.isnan(s) for s in BatchScorer(None, fake)(rows, texts)] == [
        True, True, False, False]

    settings = _settings(readability=ReadabilityConfig(require_think=False, language=None),
                         min_reward=1.0, reward_model_threshold=0.5)
    records, kept = judge_batch([rows[0], rows[2]], texts, [5] * 4, scores, settings, 2)
    assert [r.outcomes for r in records] == [[None, LOW_REWARD],
                                             [None, LOW_REWARD_MODEL_SCORE]]
    assert [(r["response"], r["reward"]) for r in kept] == [(formatted, 1.0), ("eeee", 1.0)]


def test_sources_give_each_prompt_its_kind_and_a_global_index(tmp_path: Path) -> None:
    maths, general = tmp_path / "maths.jsonl", tmp_path / "general.jsonl"
    maths.write_text("".join(json.dumps({"problem": f"{i} + 1?", "answer": str(i + 1)}) + "\n"
                             for i in range(3)))
    general.write_text('{"prompt": "Write a haiku."}\n{"prompt": "Say hello."}\n')
    sources = [{"name": "reasoning", "path": str(maths), "reward": "rules"},
               {"name": "general", "path": str(general), "reward": "reward_model",
                "prompt_field": "prompt"}]
    cfg = _cfg(data={"sources": sources})
    prompts = load_prompts(cfg)
    assert [(p.index, p.kind, p.source, p.example.prompt) for p in prompts] == [
        (0, RULES, "reasoning", "0 + 1?"), (1, RULES, "reasoning", "1 + 1?"),
        (2, RULES, "reasoning", "2 + 1?"), (3, REWARD_MODEL, "general", "Write a haiku."),
        (4, REWARD_MODEL, "general", "Say hello.")]
    # sample.prompts_path wins over the sources, and is rule-scored.
    only = _cfg(data={"sources": sources}, sample={"prompts_path": str(maths)})
    assert [(s.name, s.kind) for s in prompt_sources(only)] == [("prompts", RULES)]

    with pytest.raises(ConfigError, match=r"rewards.reward_model.load is not set"):
        check_reward_model(cfg, None)
    check_reward_model(cfg, FakeRewardModel())  # an injected scorer is enough
    with pytest.raises(TypeError, match="no score"):
        check_reward_model(cfg, object())  # type: ignore[arg-type]
    check_reward_model(only, None)  # no reward-model prompts: nothing needed
    bad = _cfg(data={"sources": [{**sources[0], "reward": "judge"}]})
    with pytest.raises(ConfigError, match=r"data.sources\[0\].reward=judge"):
        prompt_sources(bad)


def test_manifest_holds_what_decides_the_rows_but_not_the_batching() -> None:
    from r1mega.rejection.sampler import manifest

    def of(*overrides: str) -> dict[str, Any]:
        cfg = load_config(CONFIG, list(overrides), world_size=2)
        return manifest(cfg, [_prompt(0)], None)

    base = of()
    assert of("sample.prompts_per_batch=1") == base
    for override, key in (("sample.samples_per_prompt=2", "samples_per_prompt"),
                          ("rollout.temperature=0.6", "sampling"), ("train.seed=7", "seed"),
                          ("sample.min_reward=1.0", "filters"),
                          ("sample.readability.language=zh", "filters"),
                          ("data.template=none", "template")):
        assert [k for k in base if of(override)[k] != base[k]] == [key], override


def test_sample_section_is_validated_by_key() -> None:
    for override, key in (("sample.samples_per_prompt=0", "sample.samples_per_prompt=0"),
                          ("sample.prompts_per_batch=0", "sample.prompts_per_batch=0"),
                          ("sample.max_kept_per_prompt=0", "sample.max_kept_per_prompt=0")):
        with pytest.raises(ConfigError, match=key):
            load_config(CONFIG, [override], world_size=2)
    from r1mega.rejection.sampler import run_sampling

    cfg = load_config(CONFIG, ["sample.output_dir=null"], world_size=2)
    with pytest.raises(ConfigError, match="sample.output_dir is not set"):
        run_sampling(cfg)


# ---------------------------------------------------------------------- end to end


def _sample(out: Path, prompts: Path | None, *extra: str, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    for var in ("RANK", "WORLD_SIZE", KILL_ENV):
        if var not in (env or {}):
            full_env.pop(var, None)
    return subprocess.run(
        [sys.executable, "-m", "r1mega.cli", "sample", CONFIG, f"sample.output_dir={out}",
         *([f"sample.prompts_path={prompts}"] if prompts else []),
         "sample.prompts_per_batch=2", *extra],
        capture_output=True, text=True, timeout=300, env=full_env, cwd=ROOT)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"problem": f"What is {i} + {i + 1}?",
                                        "answer": str(2 * i + 1)}) + "\n" for i in range(6)))
    return path


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, prompts_file: Path) -> Path:
    """An uninterrupted run over 6 prompts in 3 batches."""
    out = tmp_path_factory.mktemp("straight")
    proc = _sample(out, prompts_file)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "batch 3/3" in proc.stdout and "done: " in proc.stdout, proc.stdout
    return out


def _recheck(out: Path, prompts_file: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every row passes the filters on its own; the stats add up and match the files."""
    cfg = load_config(CONFIG, [], world_size=2)
    prompts = [json.loads(line)["problem"] for line in prompts_file.read_text().splitlines()]
    rows = [json.loads(line) for line in (out / "dataset.jsonl").read_text().splitlines()]
    stats = json.loads((out / "stats.json").read_text())
    with RewardFunction.from_config(cfg.rewards) as reward_fn:
        totals, _ = reward_fn([RewardInput(r["prompt"], r["response"]) for r in rows])
    for row, total in zip(rows, totals, strict=True):
        assert set(row) >= {"prompt", "response", "reward", "source", "prompt_index"}
        assert row["prompt"] == prompts[row["prompt_index"]]
        assert row["source"] == f"{prompts_file}:{row['prompt_index'] + 1}"
        assert row["reward"] == pytest.approx(total) and total >= cfg.sample.min_reward, row
        assert rejection_reason(row["response"], row["response_tokens"],
                                cfg.sample.readability) is None, row
    pairs = [(r["prompt"], r["response"]) for r in rows]
    assert len(set(pairs)) == len(pairs), "duplicate rows"
    per_prompt = Counter(r["prompt_index"] for r in rows)
    assert max(per_prompt.values()) <= cfg.sample.max_kept_per_prompt

    assert stats["prompts_done"] == stats["prompts_total"] == len(prompts) and stats["complete"]
    assert stats["samples_generated"] == len(prompts) * K
    assert stats["samples_generated"] == stats["kept"] + stats["dropped_total"]
    assert stats["dropped_total"] == sum(stats["dropped"].values())
    assert stats["kept"] == len(rows) > 0 and stats["dropped_total"] > 0
    assert stats["acceptance_rate"] == pytest.approx(len(rows) / (len(prompts) * K))
    histogram = Counter(per_prompt[i] for i in range(len(prompts)))
    assert stats["kept_per_prompt"]["histogram"] == {str(k): n
                                                     for k, n in sorted(histogram.items())}
    assert stats["response_tokens"]["kept"]["total"] == sum(r["response_tokens"] for r in rows)
    assert stats["response_chars"]["kept"]["total"] == sum(len(r["response"]) for r in rows)
    progress = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    assert sorted(p["prompt_index"] for p in progress) == list(range(len(prompts)))
    assert all(p["outcomes"].count(None) == per_prompt[p["prompt_index"]] for p in progress)
    return rows, stats


def test_every_row_passes_the_filters_and_the_stats_add_up(straight: Path,
                                                           prompts_file: Path) -> None:
    _recheck(straight, prompts_file)


def test_rerunning_a_finished_run_adds_nothing(straight: Path, prompts_file: Path) -> None:
    before = {name: (straight / name).read_bytes()
              for name in ("dataset.jsonl", "progress.jsonl", "stats.json")}
    proc = _sample(straight, prompts_file, "sample.prompts_per_batch=5")  # batching may change
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "6 done, 0 to go" in proc.stdout and "nothing to sample" in proc.stdout
    assert {name: (straight / name).read_bytes() for name in before} == before


def test_killed_runs_resume_to_exactly_the_uninterrupted_rows(straight: Path,
                                                              prompts_file: Path,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "killed"
    # Batch 1 committed, then killed in the middle of committing batch 2: its rows and a
    # torn row are in dataset.jsonl, its progress lines are not.
    crash = _sample(out, prompts_file, env={KILL_ENV: "2:rows"})
    assert crash.returncode != 0 and "batch 1/3" in crash.stdout
    assert "batch 2/3" not in crash.stdout
    assert (out / "dataset.jsonl").read_bytes().endswith(TORN_ROW)
    assert len((out / "progress.jsonl").read_text().splitlines()) == 2
    resumed = _sample(out, prompts_file)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert "2 done, 4 to go" in resumed.stdout and "batch 2/2" in resumed.stdout
    rows, stats = _recheck(out, prompts_file)
    assert (out / "dataset.jsonl").read_bytes() == (straight / "dataset.jsonl").read_bytes()
    assert stats == json.loads((straight / "stats.json").read_text())


def test_general_prompts_are_judged_by_the_reward_model(tmp_path: Path,
                                                        prompts_file: Path) -> None:
    """data.sources with a rule-scored and a reward-model source, the tiny converted reward
    model of the stage-2 RL run scoring the general prompts."""
    from r1mega.rewards.tiny_reward_model import make_tiny_reward_model

    rm = make_tiny_reward_model(tmp_path / "rm")
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"prompt": p}) + "\n"
                               for p in ("Write a haiku.", "Say hello.", "Name a colour.")))
    out = tmp_path / "out"
    sources = (f"data.sources=[{{name: reasoning, path: '{prompts_file}', reward: rules}}, "
               f"{{name: general, path: '{general}', reward: reward_model, "
               "prompt_field: prompt}]")
    proc = _sample(out, None, sources, f"rewards.reward_model.load={rm}",
                   "sample.reward_model_threshold=0.0", "sample.prompts_per_batch=3")
    assert proc.returncode == 0, proc.stderr[-5000:]
    rows = [json.loads(line) for line in (out / "dataset.jsonl").read_text().splitlines()]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["prompts_done"] == 9 and stats["samples_generated"] == 9 * K
    assert stats["samples_generated"] == stats["kept"] + stats["dropped_total"]
    reasoning, judged = stats["by_source"]["reasoning"], stats["by_source"]["general"]
    assert (reasoning["kind"], judged["kind"]) == (RULES, REWARD_MODEL)
    assert reasoning["generated"] == 6 * K and judged["generated"] == 3 * K
    # Each kind is held to its own threshold, and only to it.
    assert LOW_REWARD_MODEL_SCORE not in reasoning["dropped"]
    assert LOW_REWARD not in judged["dropped"]
    assert judged["kept"] + sum(judged["dropped"].values()) == 3 * K
    general_rows = [r for r in rows if r["prompt_index"] >= 6]
    assert len(general_rows) == judged["kept"]
    assert all(r["reward"] >= 0.0 for r in general_rows)
    assert all(r["reward"] >= 0.5 for r in rows if r["prompt_index"] < 6)
