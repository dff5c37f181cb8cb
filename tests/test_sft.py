"""SFT (cold start, the large SFT stage) and distillation.

Unit tests (no processes): the cold-start generator and the readability filter, the
data report, padded and packed batch layouts, config validation, data provenance.

``tests/workers/sft_worker.py`` (2 ranks, gloo), on the tiny DeepSeek-V3 (MLA, MoE, MTP)
at TP=1 PP=2 and the tiny dense Qwen2 at TP=2, measured 2026-12-01:

* the SFT loss equals a plain-PyTorch cross-entropy over the response tokens computed by
  hand from the model's full logits: mean |diff| 1.3e-9 / 2.4e-8, per token under the
  mask 2.3e-7 / 2.5e-7, while masking all tokens or one token early would be 0.68 / 0.82
  away;
* padded and packed batches give the same loss (|diff| 3.5e-7 / 2.4e-7) and the same
  finalized gradients for every parameter (max relative diff 7.8e-7 / 4.0e-7) with a
  third less computed tokens (80 vs 120, 120 vs 180); also at DP=2: DeepSeek-V3 with
  EP=2 (9.7e-7) and Qwen2 with one rank running an empty packed sequence (4.8e-7);
* a 4-row memorization set: loss 5.57 -> 0.19 (DeepSeek-V3) and 5.56 -> 0.22 (Qwen2) in
  30 steps of megatron's distributed Adam at lr 3e-3;
* context parallelism: padded rows split over CP=2 give the loss and finalized gradients
  of DP=2 from the same weights (1e-5 relative).

End to end (`r1mega sft` / `r1mega distill` as subprocesses, 2 ranks): the cold-start
config runs, filters and counts unreadable rows, writes checkpoints and W&B metrics, and
a restarted run resumes mid-epoch with identical results; distillation trains a dense
student at TP=2 on a rejection-sampled set and reports its provenance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from r1mega.config import ConfigError, load_config
from r1mega.config.schema import ReadabilityConfig
from r1mega.data.prompts import PromptExample
from r1mega.data.readability import FilterStats, rejection_reason
from r1mega.data.tokenizers import ByteTokenizer
from r1mega.sft.batching import (
    first_fit_decreasing,
    packed_step_batch,
    padded_step_batch,
)
from r1mega.sft.coldstart import UNREADABLE_KINDS, coldstart_rows
from r1mega.sft.coldstart import main as coldstart_main
from r1mega.sft.data import SFTDataReport, SFTExample, read_rows, tokenize_rows
from r1mega.sft.provenance import read_provenance
from tests.distributed import ROOT, run_torchrun
from tests.test_cli import offline_run_keys

WORKER = ROOT / "tests" / "workers" / "sft_worker.py"
CONFIG = "configs/sft_tiny_cpu.yaml"
DISTILL_CONFIG = "configs/distill_tiny_cpu.yaml"


# ----------------------------------------------------------------------- data, filter


def test_rejection_reason_and_filter_stats() -> None:
    config = ReadabilityConfig(max_response_tokens=20)
    cases = {
        " <think> add 3 and 4 </think> <answer> 7 </answer>": None,
        "   ": "empty",
        " 7 <answer> 7 </answer>": "no_think",
        " </think> backwards <think> 7": "no_think",
        " <think> a </think> <think> b </think> 7": "no_think",
        " <think> add 3 and 4 </think>  ": "no_summary",
        " <think> 我们 计算 </think> seven": "mixed_language",
        " <think> add them </think> " + "seven " * 30: "too_long",
    }
    stats = FilterStats()
    for response, expected in cases.items():
        tokens = len(response.split())
        assert rejection_reason(response, tokens, config) == expected, response
        stats.add(rejection_reason(response, tokens, config))
    assert stats.seen == len(cases) and stats.kept == 1
    assert stats.kept + sum(stats.dropped.values()) == stats.seen
    assert stats.as_dict()["dropped"] == {"empty": 1, "no_think": 3, "no_summary": 1,
                                          "mixed_language": 1, "too_long": 1}
    # The checks can be switched off one by one.
    lax = ReadabilityConfig(require_think=False, language=None)
    assert rejection_reason(" 我们 7", None, lax) is None


def test_coldstart_rows_are_readable_except_the_planted_ones() -> None:
    rows = coldstart_rows(64, seed=7)
    config = ReadabilityConfig(max_response_tokens=256)
    tokenizer = ByteTokenizer()
    for row in rows:
        reason = rejection_reason(row["response"], len(tokenizer.encode(row["response"])),
                                  config)
        assert reason == (None if row["kind"] == "readable" else row["kind"]), row
        assert row["answer"] in row["response"].split("<answer>")[-1]
    kinds = [row["kind"] for row in rows]
    assert kinds.count("readable") == 56
    assert all(kinds.count(kind) == 2 for kind in UNREADABLE_KINDS)
    assert coldstart_rows(64, seed=7) == rows  # deterministic


def _examples(rows: list[dict[str, str]]) -> list[PromptExample]:
    return [PromptExample(i, r["prompt"], r["response"], source=f"t:{i}")
            for i, r in enumerate(rows)]


def test_tokenize_filters_and_counts_rows(tmp_path: Path) -> None:
    """Template before the prompt, EOS after the response, the loss mask on response
    and EOS only; unreadable and over-length rows dropped and counted."""
    tokenizer = ByteTokenizer()
    rows = coldstart_rows(16, seed=3)
    rows.append({"prompt": "What is 1 + 1? " + "Please be careful. " * 40,
                 "response": " <think> one plus one </think> <answer> 2 </answer>"})
    report = SFTDataReport(path="rows.jsonl", rows=len(rows))
    examples = tokenize_rows(_examples(rows), tokenizer, "r1_zero", 1000,
                             ReadabilityConfig(max_response_tokens=256), report)
    assert report.readability is not None
    assert report.readability.as_dict() == {"seen": 17, "kept": 15,
                                            "dropped": {"no_think": 1, "no_summary": 1}}
    assert report.over_length == 1 and report.kept == len(examples) == 14
    text = "\n".join(report.lines())
    assert "kept 15 of 17, dropped no_think=1, no_summary=1" in text
    assert "dropped 1 rows longer than train.seq_length=1000" in text
    assert report.metrics()["data/readability_no_think"] == 1.0

    ex = examples[0]
    prompt = tokenizer.decode(list(ex.prompt_ids))
    assert prompt.startswith("A conversation between User and Assistant")
    assert prompt.endswith(f"User: {rows[0]['prompt']}. Assistant:")
    assert ex.response_ids[-1] == tokenizer.eos_id
    assert tokenizer.decode(list(ex.response_ids)) == rows[0]["response"]
    mask = ex.loss_mask()
    assert len(mask) == ex.num_inputs == len(ex.ids) - 1
    first = mask.index(1.0)
    assert first == len(ex.prompt_ids) - 1 and sum(mask) == len(ex.response_ids)
    assert ex.ids[first + 1] == ex.response_ids[0]  # position `first` predicts it

    # Without the filter, unreadable rows are trained on.
    all_rows = tokenize_rows(_examples(rows), tokenizer, "r1_zero", 10_000, None, report)
    assert len(all_rows) == 17 and report.readability is None


def test_malformed_rows_are_skipped_and_reported(tmp_path: Path) -> None:
    path = tmp_path / "sft.jsonl"
    good = json.dumps({"prompt": "What is 2 + 2?", "response": " <think> 4 </think> 4"})
    path.write_text(good + "\n{not json\n" + json.dumps({"prompt": "no response"}) + "\n"
                    + good + "\n")
    cfg = OmegaConf.create({"train_path": str(path), "prompt_field": "prompt",
                            "response_field": "response"})
    rows, report = read_rows(cfg, 0)
    assert [r.answer for r in rows] == [" <think> 4 </think> 4"] * 2
    assert report.malformed == {"invalid_json": 1, "missing_answer": 1}
    assert report.first_malformed == f"{path}:2 (invalid_json)"
    assert "skipped 2 malformed rows" in "\n".join(report.lines())


def test_coldstart_cli_writes_jsonl(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cold.jsonl"
    assert coldstart_main([str(out), "--n", "16"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 16 and {"prompt", "response", "answer", "kind"} <= set(rows[0])
    assert "wrote 16 rows (2 deliberately unreadable)" in capsys.readouterr().out


# ----------------------------------------------------------------------- batching


def _rows(*shapes: tuple[int, int]) -> list[SFTExample]:
    out, token = [], 1
    for prompt, response in shapes:
        ids = list(range(token, token + prompt + response))
        token += prompt + response
        out.append(SFTExample(tuple(ids[:prompt]), tuple(ids[prompt:])))
    return out


def test_first_fit_decreasing() -> None:
    assert first_fit_decreasing([5, 9, 3, 7, 1], capacity=10) == [[1, 4], [3, 2], [0]]
    with pytest.raises(ValueError, match="exceeds"):
        first_fit_decreasing([11], capacity=10)


def test_padded_and_packed_layouts_of_one_global_batch() -> None:
    """Both layouts hold every row's tokens once with the same loss tokens; DP ranks get
    disjoint shares and the same number and shape of microbatches."""
    rows = _rows((3, 4), (2, 2), (5, 6), (2, 3), (4, 1), (6, 5), (3, 2), (2, 7))
    response_tokens = sum(len(r.response_ids) for r in rows)
    for dp_rank in (0, 1):
        padded = padded_step_batch(rows, dp_rank, 2, micro_batch_size=2, pad_id=0,
                                   pad_multiple=4)
        assert [mb["tokens"].shape for mb in padded.microbatches] == [(2, 12), (2, 12)]
        packed = packed_step_batch(rows, dp_rank, 2, capacity=16, pad_id=0, pad_multiple=4)
        shapes = {mb["tokens"].shape for mb in packed.microbatches}
        assert len(shapes) == 1 and next(iter(shapes))[0] == 1
        assert next(iter(shapes))[1] % 4 == 0
        for batch in (padded, packed):
            assert batch.response_tokens == response_tokens
            assert batch.real_tokens == sum(r.num_inputs for r in rows)
        share = rows[dp_rank * 4:(dp_rank + 1) * 4]
        for batch in (padded, packed):
            tokens = torch.cat([mb["tokens"][mb["loss_mask"] > 0] for mb in batch.microbatches])
            labels = torch.cat([mb["labels"][mb["loss_mask"] > 0] for mb in batch.microbatches])
            expected = sorted(t for r in share for t in r.response_ids)
            assert sorted(labels.tolist()) == expected
            assert len(tokens) == sum(len(r.response_ids) for r in share)
        # Packed: segments restart positions; the padding segment has no loss.
        mb = packed.microbatches[0]
        cu = mb["cu_seqlens"].tolist()
        assert mb["position_ids"][0, cu[1]].item() == 0
        assert packed.computed_tokens < padded.computed_tokens
    counts = [len(packed_step_batch(rows, r, 2, capacity=16, pad_id=0).microbatches)
              for r in (0, 1)]
    assert counts[0] == counts[1]


def test_empty_packed_sequence_pads_a_rank_without_loss() -> None:
    rows = _rows((8, 8), (8, 7), (1, 2), (1, 2))  # rank 0: 2 full sequences, rank 1: 1
    rank1 = packed_step_batch(rows, 1, 2, capacity=16, pad_id=0)
    assert len(rank1.microbatches) == 2
    empty = rank1.microbatches[1]
    assert empty["loss_mask"].sum() == 0 and empty["cu_seqlens"].tolist() == [0, 15]


# ----------------------------------------------------------------------- config


def test_sft_config_errors_name_their_keys() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, ["sft.epochs=0", "sft.readability.language=fr",
                             "sft.readability.min_language_fraction=1.5",
                             "sft.response_field=''", "sft.train_path=rows.csv"])
    text = str(err.value)
    for needle in ("sft.epochs=0 must be >= 1", "sft.readability.language=fr",
                   "sft.readability.min_language_fraction=1.5 must be in [0, 1]",
                   "sft.response_field must be a non-empty", "sft.train_path=rows.csv"):
        assert needle in text, text
    assert load_config(DISTILL_CONFIG, world_size=2).train_layout.tp == 2


# ----------------------------------------------------------------------- provenance


def _sample_dir(directory: Path, rows: list[dict[str, str]], kept: int | None = None,
                complete: bool = True, template: str = "r1_zero") -> Path:
    """A directory as `r1mega sample` leaves it: dataset.jsonl, stats.json, run.json."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "dataset.jsonl"
    data.write_text("".join(json.dumps({**r, "reward": 1.0}) + "\n" for r in rows))
    kept = len(rows) if kept is None else kept
    (directory / "stats.json").write_text(json.dumps({
        "prompts_total": 8, "prompts_done": 8 if complete else 5, "complete": complete,
        "samples_generated": 32, "kept": kept, "dropped_total": 32 - kept,
        "dropped": {"reward": 32 - kept - 3, "readability_no_think": 3, "duplicate": 0},
        "acceptance_rate": kept / 32}))
    (directory / "run.json").write_text(json.dumps({
        "weights": "runs/tiny_cpu/checkpoints/step_00000003", "template": template,
        "model": {"arch": "deepseek_v3", "num_layers": 4, "hidden_size": 64},
        "samples_per_prompt": 4, "sampling": {"temperature": 0.8}}))
    return data


def test_provenance_is_read_and_checked(tmp_path: Path) -> None:
    rows = [{"prompt": "p", "response": "r"}] * 3
    good = read_provenance(_sample_dir(tmp_path / "a", rows), "r1_zero")
    assert good is not None and not good.warnings
    text = "\n".join(good.lines())
    assert "teacher: deepseek_v3 (4 layers, hidden 64)" in text
    assert "kept 3 (9.4%)" in text and "readability_no_think=3" in text
    bad = read_provenance(_sample_dir(tmp_path / "b", rows, kept=5, complete=False,
                                      template="chat"), "r1_zero")
    assert bad is not None
    warnings = "\n".join(bad.warnings)
    assert "records 5 kept rows but dataset.jsonl has 3" in warnings
    assert "has not finished" in warnings and "template 'chat'" in warnings
    (tmp_path / "c").mkdir()
    assert read_provenance(tmp_path / "c" / "rows.jsonl") is None


# ----------------------------------------------------------------------- model


def test_sft_loss_masking_packing_and_memorization(tmp_path: Path) -> None:
    """See the module docstring for the measured values."""
    run_torchrun(2, WORKER, tmp_path, timeout=600)
    results = json.loads((tmp_path / "result.json").read_text())
    for name in ("deepseek_v3", "dense", "deepseek_v3_dp2", "dense_dp2"):
        packing = results[name]["packing"]
        assert packing["tokens"][0] == packing["tokens"][1]
        assert packing["loss_abs_diff"] < 1e-5, (name, packing)
        assert packing["grad_max_rel_diff"] < 1e-5, (name, packing)
        assert packing["params_with_grad"] == packing["num_params"], (name, packing)
        assert packing["computed_tokens"][1] < packing["computed_tokens"][0]
    assert results["dense_dp2"]["packing"]["max_empty_packed"] == 1
    for name in ("deepseek_v3_cp2", "dense_cp2"):
        cp = results[name]
        assert "CP=2" in cp["layout"] and cp["tokens"][0] == cp["tokens"][1] > 0, cp
        assert cp["loss_abs_diff"] < 1e-5 and cp["grad_max_rel_diff"] < 1e-5, (name, cp)
    assert "EP=2" in results["deepseek_v3_dp2"]["layout"]
    for name in ("deepseek_v3", "dense"):
        masked = results[name]["masked_loss"]
        assert masked["tokens"] == masked["expected_tokens"]
        assert masked["abs_diff"] < 1e-5 and masked["per_token_max_diff"] < 1e-5, masked
        assert masked["control_gap"] > 0.3, masked
        losses = results[name]["memorize"]
        assert losses[0] > 5.0 and losses[-1] < 0.1 * losses[0], losses
        assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses


# ----------------------------------------------------------------------- end to end


def r1mega(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "r1mega.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def _step_lines(stdout: str) -> dict[str, str]:
    """Step lines by step number, without the timing fields (they vary)."""
    return {line.split(" | ")[0]: " | ".join(line.split(" | ")[:6])
            for line in stdout.splitlines() if line.startswith("step ")}


def test_sft_cli_runs_checkpoints_logs_and_resumes(tmp_path: Path) -> None:
    """`r1mega sft configs/sft_tiny_cpu.yaml` (random initial weights instead of the
    cached tiny base model, to stay fast): 3 steps on 2 pipeline stages with a checkpoint
    each, then the last step again from the step-2 checkpoint (mid-epoch: 16 of 56 rows
    done) -- same loss, grad norm and learning rate."""
    save_dir = tmp_path / "ck"
    common = [CONFIG, "checkpoint.load=null", f"checkpoint.save_dir={save_dir}",
              "checkpoint.save_interval=1", "checkpoint.keep_last=0", "train.steps=3",
              f"logging.wandb_dir={tmp_path}"]
    first = r1mega("sft", *common)
    assert first.returncode == 0, first.stderr[-5000:]
    out = first.stdout
    assert "train layout TP=1 PP=2" in out and "supervised fine-tuning of deepseek_v3" in out
    assert ("readability filter: kept 56 of 64, dropped no_think=2, no_summary=2, "
            "mixed_language=2, too_long=2") in out
    assert "56 rows x 4 epoch(s) in global batches of 8 = 28 steps" in out
    lines = _step_lines(out)
    assert list(lines) == ["step 1/3", "step 2/3", "step 3/3"], out
    assert "epoch 0.43/4" in lines["step 3/3"]
    losses = [float(line.split("loss ")[1].split(" ")[0]) for line in lines.values()]
    assert 5.5 < losses[0] < 6.5, losses  # about ln(512) at random initialisation
    for step in (1, 2, 3):
        assert (save_dir / f"step_{step:08d}" / "r1mega_config.yaml").exists()
    keys = offline_run_keys(tmp_path)
    for key in ("train/loss", "train/grad_norm", "train/lr", "train/epoch",
                "train/response_tokens", "perf/tokens_per_s", "perf/time_step_s",
                "perf/padding_frac", "train/data_kept", "train/data_readability_no_think"):
        assert key in keys, sorted(keys)

    # Resume from step 2, as after a crash during step 3.
    (save_dir / "latest").write_text("step_00000002")
    import shutil

    shutil.rmtree(save_dir / "step_00000003")
    second = r1mega("sft", *common, "logging.wandb_mode=disabled")
    assert second.returncode == 0, second.stderr[-5000:]
    assert "resumed from" in second.stdout and "(step 2; epoch 0, next row 16 of 56)" \
        in second.stdout
    assert list(_step_lines(second.stdout)) == ["step 3/3"]
    assert _step_lines(second.stdout)["step 3/3"] == lines["step 3/3"]


def test_distill_trains_a_student_in_another_layout(tmp_path: Path) -> None:
    """`r1mega distill`: a dense Qwen2-shaped student at TP=2 (the teacher, tiny
    DeepSeek-V3, trains at PP=2) on a rejection-sampled set of 8 rows; the provenance is
    printed, and the loss falls over 12 steps at lr 1e-2 (measured 6.26 -> 3.24: the
    student has learned the byte statistics of the responses, not yet the rows)."""
    rows = [r for r in coldstart_rows(16, seed=5) if r["kind"] == "readable"][:8]
    data = _sample_dir(tmp_path / "sample", rows)
    out = r1mega("distill", DISTILL_CONFIG, f"sft.train_path={data}", "sft.epochs=12",
                 f"checkpoint.save_dir={tmp_path / 'ck'}", "logging.wandb_mode=disabled",
                 "train.lr=1e-2", "train.min_lr=1e-2", "train.lr_warmup_steps=0")
    assert out.returncode == 0, out.stderr[-5000:]
    text = out.stdout
    assert "train layout TP=2 PP=1" in text
    assert "distillation: SFT of the student qwen2 (2 layers, hidden 64)" in text
    assert "teacher: deepseek_v3 (4 layers, hidden 64)" in text
    assert "samples generated 32, kept 8" in text and "warning" not in text
    lines = _step_lines(text)
    assert len(lines) == 12, text
    losses = [float(line.split("loss ")[1].split(" ")[0]) for line in lines.values()]
    assert losses[-1] < 0.6 * losses[0], losses
    saved = OmegaConf.load(tmp_path / "ck" / "step_00000012" / "r1mega_config.yaml")
    assert saved.model.arch == "qwen2" and saved.train_layout.tp == 2
