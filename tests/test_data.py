"""Tests for r1mega.data: prompt files, the DP sampler, templates and tokenizers.

Everything is built in-process (Parquet via pyarrow, a sentencepiece model trained on a
few KB, a word-level HF tokenizer saved to tmp_path), so the tests need no downloads.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from r1mega.config.schema import DataConfig, TokenizerConfig
from r1mega.data import (
    R1_ZERO_TEMPLATE,
    ByteTokenizer,
    EmptyDatasetError,
    HFTokenizer,
    PromptDataset,
    PromptExample,
    PromptSampler,
    SentencePieceTokenizer,
    SkippedRow,
    apply_template,
    build_tokenizer,
    check_template,
    load_prompt_dataset,
)

PAPER_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning "
    "process here </think> <answer> answer here </answer>. User: {prompt}. Assistant:"
)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- JSONL


@pytest.fixture
def messy_jsonl(tmp_path: Path) -> Path:
    lines = [
        json.dumps({"problem": "What is 1+1?", "answer": "2", "level": 1}),  # 1 ok
        '{"problem": "broken", ',  # 2 invalid json
        json.dumps(["not", "an", "object"]),  # 3 not an object
        json.dumps({"question": "wrong field", "answer": "x"}),  # 4 missing prompt
        json.dumps({"problem": "   ", "answer": "x"}),  # 5 empty prompt
        json.dumps({"problem": 42, "answer": "x"}),  # 6 non-string prompt
        json.dumps({"problem": "No answer here"}),  # 7 missing answer
        "",  # 8 blank: ignored, not a row
        json.dumps({"problem": "Sum {a}+{b} in $\\frac{1}{2}$", "answer": 7}),  # 9 ok, int
        json.dumps({"problem": None, "answer": "x"}),  # 10 null prompt
        json.dumps({"problem": "list answer", "answer": [1, 2]}),  # 11 non-string answer
        json.dumps("just a string"),  # 12 not an object
    ]
    return write_lines(tmp_path / "train.jsonl", lines)


def test_jsonl_skips_malformed_rows_with_line_numbers(messy_jsonl: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="r1mega.data.prompts"):
        ds = PromptDataset(messy_jsonl, prompt_field="problem", answer_field="answer")

    assert len(ds) == 2
    first, second = ds[0], ds[1]
    assert first == PromptExample(0, "What is 1+1?", "2", {"level": 1}, f"{messy_jsonl}:1")
    assert second.index == 1
    assert second.prompt == "Sum {a}+{b} in $\\frac{1}{2}$"
    assert second.answer == "7"  # numeric answers become text
    assert second.source == f"{messy_jsonl}:9"

    p = str(messy_jsonl)
    assert ds.skipped == [
        SkippedRow(p, 2, "invalid_json"),
        SkippedRow(p, 3, "not_object"),
        SkippedRow(p, 4, "missing_prompt"),
        SkippedRow(p, 5, "empty_prompt"),
        SkippedRow(p, 6, "non_string_prompt"),
        SkippedRow(p, 7, "missing_answer"),
        SkippedRow(p, 10, "missing_prompt"),
        SkippedRow(p, 11, "non_string_answer"),
        SkippedRow(p, 12, "not_object"),
    ]
    assert ds.skip_counts == {
        "invalid_json": 1, "not_object": 2, "missing_prompt": 2, "empty_prompt": 1,
        "non_string_prompt": 1, "missing_answer": 1, "non_string_answer": 1,
    }
    # Each skipped row is reported with file and line, plus one summary.
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"{p}: line 2: skipped (invalid_json)" in m for m in messages)
    assert any(f"{p}: line 7: skipped (missing_answer)" in m for m in messages)
    assert any("skipped 9 of 11 rows" in m for m in messages)


def test_per_row_warnings_are_capped_but_every_skip_is_recorded(tmp_path: Path,
                                                                 caplog) -> None:
    lines = [json.dumps({"problem": "ok", "answer": "1"})] + ["{bad"] * 50
    path = write_lines(tmp_path / "many_bad.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="r1mega.data.prompts"):
        ds = PromptDataset(path, max_warnings=3)
    assert len(ds.skipped) == 50 and ds.skip_counts == {"invalid_json": 50}
    assert [s.line for s in ds.skipped] == list(range(2, 52))
    assert len(caplog.records) == 4  # three rows, then only the summary


def test_answer_not_required_keeps_rows_without_answer(messy_jsonl: Path) -> None:
    ds = PromptDataset(messy_jsonl, require_answer=False)
    prompts = [e.prompt for e in ds]
    assert prompts == ["What is 1+1?", "No answer here", "Sum {a}+{b} in $\\frac{1}{2}$",
                       "list answer"]
    assert ds[1].answer is None and ds[1].metadata == {}
    assert ds[3].answer is None and ds[3].metadata == {"answer": [1, 2]}
    assert "missing_answer" not in ds.skip_counts


def test_no_answer_field_and_metadata_for_code_tasks(tmp_path: Path) -> None:
    tests = [{"input": "1 2\n", "output": "3\n"}]
    path = write_lines(tmp_path / "code.json", [
        json.dumps({"prompt": "Add two numbers.", "tests": tests, "lang": "python"}),
    ])
    ds = PromptDataset(path, prompt_field="prompt", answer_field=None)
    assert ds[0].answer is None
    assert ds[0].metadata == {"tests": tests, "lang": "python"}


def test_nested_fields(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "nested.jsonl", [
        json.dumps({"meta": {"question": "Q1", "id": 7}, "sol": {"final": "A1"}}),
        json.dumps({"meta": {"id": 8}, "sol": {"final": "A2"}}),  # line 2: no question
        json.dumps({"meta": "flat", "sol": {"final": "A3"}}),  # line 3: meta not a dict
    ])
    ds = PromptDataset(path, prompt_field="meta.question", answer_field="sol.final")
    assert len(ds) == 1
    assert (ds[0].prompt, ds[0].answer) == ("Q1", "A1")
    assert ds[0].metadata == {"meta": {"id": 7}, "sol": {}}
    assert [(s.line, s.reason) for s in ds.skipped] == [(2, "missing_prompt"),
                                                        (3, "missing_prompt")]


def test_dotted_column_name_wins_over_nesting(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "flat.jsonl",
                       [json.dumps({"meta.question": "flat Q", "answer": "a"})])
    assert PromptDataset(path, prompt_field="meta.question")[0].prompt == "flat Q"


def test_json_array_file(tmp_path: Path) -> None:
    path = tmp_path / "arr.json"
    path.write_text(json.dumps([{"problem": "a", "answer": "1"}, {"problem": ""}]))
    ds = PromptDataset(path)
    assert [e.prompt for e in ds] == ["a"]
    assert ds.skipped == [SkippedRow(str(path), 1, "empty_prompt")]


def test_invalid_utf8_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"problem": "ok", "answer": "1"}\n{"problem": "\xff\xfe"}\n')
    ds = PromptDataset(path)
    assert len(ds) == 1
    assert ds.skipped == [SkippedRow(str(path), 2, "invalid_encoding")]


def test_empty_dataset_errors_name_the_file(tmp_path: Path) -> None:
    bad = write_lines(tmp_path / "bad.jsonl", ["not json", json.dumps({"q": "x"})])
    with pytest.raises(EmptyDatasetError, match=r"bad\.jsonl.*invalid_json=1.*missing_prompt=1"):
        PromptDataset(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(EmptyDatasetError, match=r"empty\.jsonl.*no rows"):
        PromptDataset(empty)


def test_unsupported_extension_and_missing_file(tmp_path: Path) -> None:
    csv = tmp_path / "data.csv"
    csv.write_text("problem,answer\n1,2\n")
    with pytest.raises(ValueError, match=r"unsupported.*'\.csv'.*data\.csv.*\.jsonl"):
        PromptDataset(csv)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        PromptDataset(tmp_path / "nope.jsonl")


def test_load_prompt_dataset_from_config(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "t.jsonl", [json.dumps({"q": "hi", "a": "1"})])
    cfg = DataConfig(train_path=str(path), prompt_field="q", answer_field="a")
    assert load_prompt_dataset(cfg, "train")[0].answer == "1"
    with pytest.raises(ValueError, match="data.eval_path is not set"):
        load_prompt_dataset(cfg, "eval")


# --------------------------------------------------------------------------- Parquet


def test_parquet_with_null_prompt_and_nested_struct(tmp_path: Path, caplog) -> None:
    table = pa.table({
        "problem": ["p0", None, "p2", ""],
        "answer": ["a0", "a1", None, "a3"],
        "info": [{"source": "s0", "q": "n0"}, {"source": "s1", "q": "n1"},
                 {"source": "s2", "q": None}, {"source": "s3", "q": "n3"}],
    })
    path = tmp_path / "train.parquet"
    pq.write_table(table, path, row_group_size=2)  # several row groups: indices stay global

    with caplog.at_level(logging.WARNING, logger="r1mega.data.prompts"):
        ds = PromptDataset(path)
    assert [e.prompt for e in ds] == ["p0"]
    assert ds[0].metadata == {"info": {"source": "s0", "q": "n0"}}
    assert ds[0].source == f"{path}:row 0"
    assert ds.skipped == [SkippedRow(str(path), 1, "missing_prompt"),
                          SkippedRow(str(path), 2, "missing_answer"),
                          SkippedRow(str(path), 3, "empty_prompt")]
    assert any(f"{path}: row 1: skipped (missing_prompt)" in r.getMessage()
               for r in caplog.records)

    nested = PromptDataset(path, prompt_field="info.q", answer_field="info.source")
    assert [(e.prompt, e.answer) for e in nested] == [("n0", "s0"), ("n1", "s1"), ("n3", "s3")]
    assert nested.skipped == [SkippedRow(str(path), 2, "missing_prompt")]


# --------------------------------------------------------------------------- sampler


def make_examples(n: int) -> list[PromptExample]:
    return [PromptExample(i, f"q{i}", str(i), {}, f"mem:{i}") for i in range(n)]


def global_batches(n: int, batch_size: int, steps: int, seed: int = 0,
                   shuffle: bool = True) -> list[list[int]]:
    sampler = PromptSampler(make_examples(n), batch_size, seed=seed, shuffle=shuffle)
    return [[e.index for e in sampler.next_batch()] for _ in range(steps)]


def test_dp_ranks_are_disjoint_and_cover_the_global_batch() -> None:
    data, dp_size, batch = make_examples(24), 4, 8
    samplers = [PromptSampler(data, batch, seed=3, dp_rank=r, dp_size=dp_size)
                for r in range(dp_size)]
    reference = global_batches(24, batch, steps=6, seed=3)
    for step in range(6):
        parts = [[e.index for e in s.next_batch()] for s in samplers]
        assert all(len(p) == batch // dp_size for p in parts)
        flat = [i for p in parts for i in p]
        assert len(set(flat)) == len(flat)  # disjoint
        assert flat == reference[step]  # rank slices concatenate to the global batch


def test_every_prompt_once_per_epoch_and_reshuffled_across_epochs() -> None:
    batches = global_batches(12, 4, steps=6, seed=5)
    epoch0 = [i for b in batches[:3] for i in b]
    epoch1 = [i for b in batches[3:] for i in b]
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))
    assert epoch0 != epoch1
    assert epoch0 != list(range(12))
    assert global_batches(12, 4, steps=6, seed=5) == batches  # deterministic
    assert global_batches(12, 4, steps=6, seed=6) != batches  # seed matters


def test_no_shuffle_is_file_order_and_batches_straddle_epochs() -> None:
    assert global_batches(5, 2, steps=3, shuffle=False) == [[0, 1], [2, 3], [4, 0]]
    sampler = PromptSampler(make_examples(3), 7, seed=0, shuffle=False)
    assert [e.index for e in sampler.next_batch()] == [0, 1, 2, 0, 1, 2, 0]
    assert sampler.state_dict()["epoch"] == 2 and sampler.state_dict()["position"] == 1


def test_resume_from_state_dict_gives_identical_batches() -> None:
    data = make_examples(10)
    run = PromptSampler(data, 4, seed=11, dp_rank=1, dp_size=2)
    for _ in range(4):  # crosses an epoch boundary mid-batch (10 is not a multiple of 4)
        run.next_batch()
    state = json.loads(json.dumps(run.state_dict()))  # survives a checkpoint round trip
    expected = [[e.index for e in run.next_batch()] for _ in range(7)]

    resumed = PromptSampler(data, 4, seed=11, dp_rank=1, dp_size=2)
    resumed.load_state_dict(state)
    assert [[e.index for e in resumed.next_batch()] for _ in range(7)] == expected

    # The state is global: a rank of a differently sized DP group resumes consistently.
    full = PromptSampler(data, 4, seed=11)
    full.load_state_dict(state)
    assert [e.index for e in full.next_batch()][2:] == expected[0]


def test_iteration_and_state_validation() -> None:
    sampler = PromptSampler(make_examples(6), 2, seed=1)
    it = iter(sampler)
    first = [next(it) for _ in range(2)]
    assert all(len(b) == 2 for b in first)
    assert sampler.state_dict()["position"] == 4

    with pytest.raises(ValueError, match="dataset_size: saved 6, now 7"):
        PromptSampler(make_examples(7), 2, seed=1).load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="seed: saved 1, now 2"):
        PromptSampler(make_examples(6), 2, seed=2).load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="not divisible by dp_size=4"):
        PromptSampler(make_examples(6), 6, seed=1, dp_size=4)
    with pytest.raises(ValueError, match="dp_rank"):
        PromptSampler(make_examples(6), 4, seed=1, dp_rank=2, dp_size=2)


# --------------------------------------------------------------------------- templates


def test_r1_zero_template_is_the_paper_text() -> None:
    assert R1_ZERO_TEMPLATE == PAPER_TEMPLATE
    prompt = "What is $\\{x\\}$ if x = 3"
    expected = PAPER_TEMPLATE.replace("{prompt}", prompt)
    assert apply_template("r1_zero", prompt) == expected
    assert expected.endswith("User: What is $\\{x\\}$ if x = 3. Assistant:")
    assert apply_template("r1_zero", prompt, open_think=True) == expected + " <think>"


def test_none_template_and_unknown_names() -> None:
    assert apply_template("none", "raw {text}") == "raw {text}"
    with pytest.raises(ValueError, match="open_think"):
        apply_template("none", "x", open_think=True)
    with pytest.raises(ValueError, match="unknown template 'r1'.*r1_zero"):
        apply_template("r1", "x")


def make_hf_tokenizer_dir(path: Path, chat_template: str | None) -> Path:
    """A word-level HF tokenizer built in-process and saved as a local directory."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "what", "is", "2", "+", "?", "hello", "world"]
    raw = RawTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(str(path))
    return path


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_chat_template_through_hf_tokenizer(tmp_path: Path) -> None:
    tok = HFTokenizer(make_hf_tokenizer_dir(tmp_path / "tok", CHAT_TEMPLATE))
    assert apply_template("chat", "what is 2 + 2 ?", tok) == (
        "<s><|user|>what is 2 + 2 ?\n<|assistant|>"
    )
    assert apply_template("chat", "hello", tok, open_think=True).endswith(
        "<|assistant|><think>\n")
    # A raw transformers tokenizer works too.
    assert apply_template("chat", "hello", tok.hf) == "<s><|user|>hello\n<|assistant|>"

    ids = tok.encode("what is 2 + 2 ?")
    assert ids == [4, 5, 6, 7, 6, 8]  # no special tokens added by encode
    assert tok.decode(ids + [tok.eos_id]) == "what is 2 + 2?"
    assert (tok.eos_id, tok.pad_id, tok.bos_id, tok.vocab_size) == (2, 0, 1, 11)


def test_chat_template_errors(tmp_path: Path) -> None:
    plain = HFTokenizer(make_hf_tokenizer_dir(tmp_path / "plain", None))
    with pytest.raises(ValueError, match="has none"):
        apply_template("chat", "x", plain)
    with pytest.raises(ValueError, match="Hugging Face tokenizer.*ByteTokenizer"):
        check_template("chat", ByteTokenizer())
    with pytest.raises(ValueError, match="no tokenizer"):
        apply_template("chat", "x")


# --------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trips_unicode() -> None:
    tok = ByteTokenizer()
    text = "Ünïcödé ∑ 数学 😀\n\t{}<think>"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 258, 259)
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.eos_id],
                      skip_special_tokens=False) == "<s>hi</s>"
    assert tok.decode(tok.encode("😀")[:2]) == "\ufffd"  # truncated char: no exception


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import sentencepiece as spm

    lines = [f"The quick brown fox jumps over the lazy dog number {i}." for i in range(200)]
    lines += [f"Solve x^2 + {i}x = 0 and give the answer in <answer> tags." for i in range(100)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=400, model_type="bpe",
        normalization_rule_name="identity", byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2,
    )
    path = tmp_path_factory.mktemp("sp") / "tok.model"
    path.write_bytes(model.getvalue())
    return path


def test_sentencepiece_round_trip(sp_model: Path) -> None:
    tok = SentencePieceTokenizer(sp_model)
    for text in ["The quick brown fox.", "Solve x^2 = 4 <answer>2</answer>", "数学 😀 Ünï"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 3, 400)
    ids = tok.encode("fox jumps")
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == "fox jumps"
    assert tok.decode([tok.bos_id, *ids, tok.eos_id], skip_special_tokens=False) == (
        "<s>fox jumps</s>")


def test_build_tokenizer_dispatch_and_errors(tmp_path: Path, sp_model: Path) -> None:
    assert isinstance(build_tokenizer(TokenizerConfig(type="bytes")), ByteTokenizer)
    assert isinstance(build_tokenizer(TokenizerConfig(type="sentencepiece", path=str(sp_model))),
                      SentencePieceTokenizer)
    hf_dir = make_hf_tokenizer_dir(tmp_path / "hf", CHAT_TEMPLATE)
    assert isinstance(build_tokenizer(TokenizerConfig(type="hf", path=str(hf_dir))), HFTokenizer)

    with pytest.raises(ValueError, match=r"tokenizer\.path must be set.*type=hf"):
        build_tokenizer(TokenizerConfig(type="hf"))
    with pytest.raises(ValueError, match=r"tokenizer\.path must be set.*type=sentencepiece"):
        build_tokenizer(TokenizerConfig(type="sentencepiece", path=None))
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.path .*missing"):
        build_tokenizer(TokenizerConfig(type="hf", path=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="unknown tokenizer.type 'tiktoken'"):
        build_tokenizer(SimpleNamespace(type="tiktoken", path=None))
