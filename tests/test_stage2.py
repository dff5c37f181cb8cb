"""DeepSeek-R1's second RL stage: GRPO over reasoning prompts (rule rewards) and general
prompts (a reward model), mixed in configured proportions and logged per source."""

from __future__ import annotations

from pathlib import Path

import pytest

from r1mega.config import ConfigError, load_config
from r1mega.data.prompts import PromptExample
from r1mega.data.sources import MixedPromptSampler, Source, split_by_weight
from tests.test_cli import offline_run_history, r1mega

STAGE2 = "configs/r1_stage2_tiny_cpu.yaml"


@pytest.mark.parametrize(("total", "weights", "expected"), [
    (4, [1.0, 1.0], [2, 2]), (5, [1.0, 1.0], [3, 2]), (4, [3.0, 1.0], [3, 1]),
    (3, [1.0, 1.0, 1.0], [1, 1, 1]), (2, [1.0, 0.0], [2, 0]), (7, [0.2, 0.5, 0.3], [1, 4, 2]),
])
def test_split_by_weight(total: int, weights: list[float], expected: list[int]) -> None:
    assert split_by_weight(total, weights) == expected


def _examples(tag: str, n: int) -> list[PromptExample]:
    return [PromptExample(index=i, prompt=f"{tag}{i}", answer=None) for i in range(n)]


def test_mixed_sampler_tags_rows_and_resumes() -> None:
    def make() -> MixedPromptSampler:
        return MixedPromptSampler([Source("a", _examples("a", 5), 3.0, "rules"),
                                   Source("b", _examples("b", 3), 1.0, "reward_model")],
                                  prompts_per_step=4, seed=1)

    sampler = make()
    first = sampler.next_batch()
    assert [ex.metadata["source"] for ex in first] == ["a", "a", "a", "b"]
    assert [ex.metadata["reward_kind"] for ex in first] == ["rules"] * 3 + ["reward_model"]
    state = sampler.state_dict()
    want = [ex.prompt for ex in sampler.next_batch()]
    resumed = make()
    resumed.load_state_dict(state)
    assert [ex.prompt for ex in resumed.next_batch()] == want


def test_reward_model_source_needs_a_reward_model() -> None:
    with pytest.raises(ConfigError, match="rewards.reward_model.load is not set"):
        load_config(STAGE2, ["rewards.reward_model.load=null"], world_size=2)
    with pytest.raises(ConfigError, match=r"data.sources\[0\].reward=judge"):
        load_config(STAGE2, ["data.sources=[{name: a, path: builtin:arithmetic, "
                             "reward: judge}]"], world_size=2)


def test_stage2_rl_runs_with_both_reward_sources(tmp_path: Path) -> None:
    from r1mega.rewards.tiny_reward_model import make_tiny_reward_model

    rm = make_tiny_reward_model(tmp_path / "rm")
    out = r1mega("train", STAGE2, "checkpoint.load=null", "train.steps=2",
                 "rollout.max_new_tokens=8",
                 f"rewards.reward_model.load={rm}", f"checkpoint.save_dir={tmp_path / 'ck'}",
                 f"logging.wandb_dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-5000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and all("reasoning " in line and "general " in line
                                   for line in lines), out.stdout
    rows = offline_run_history(tmp_path)
    assert len(rows) == 2
    for row in rows:
        # Both sources were drawn and scored each step: the rule rewards on the reasoning
        # prompts (format/accuracy exist), the reward model's non-zero scores on the rest.
        assert "reward/reasoning/mean" in row and "reward/format" in row
        assert float(row["reward/general/mean"]) != 0.0
