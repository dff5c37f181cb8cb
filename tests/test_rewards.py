"""Tests for r1mega.rewards: every built-in reward, the registry and the weighted sum.

The accuracy tests inject faults through ``params.verify_fn`` pointing at
:func:`faulty_verify` below, which the spawned verifier workers import from this module:
it hangs, raises or kills its process on marker answers and defers to math-verify
otherwise, so one batch can mix faults with genuine checks.
"""

from __future__ import annotations

import os
import time

import pytest
from omegaconf import OmegaConf

from r1mega.config import ConfigError, RewardsConfig, RewardSpec
from r1mega.rewards import (
    AccuracyReward,
    CodeReward,
    FormatReward,
    LanguageReward,
    Reward,
    RewardFunction,
    RewardInput,
    RewardResult,
    available_rewards,
    extract_final_answer,
    extract_program,
    format_ok,
    get_reward,
    language_fraction,
    math_verify_check,
    outputs_match,
    register_reward,
)
from r1mega.rewards.extract import last_answer_block, last_boxed, think_block
from r1mega.rewards.language import words

FAULTY = "tests.test_rewards:faulty_verify"


def faulty_verify(gold: str, pred: str) -> bool:
    """``verify_fn`` for the tests: math-verify, except on the marker answers."""
    if pred == "HANG":
        time.sleep(60)
    if pred == "CRASH":
        raise RuntimeError("injected crash")
    if pred == "DIE":
        os._exit(13)
    return math_verify_check(gold, pred)


def sample(answer_text: str | None, gold: str | None = None, **metadata: object) -> RewardInput:
    """A response ``<think>..</think><answer>{answer_text}</answer>`` (no answer if None)."""
    response = "<think>\nworking\n</think>\n"
    if answer_text is not None:
        response += f"<answer>{answer_text}</answer>"
    return RewardInput(prompt="q", response=response, answer=gold, metadata=dict(metadata))


def scores(results: list[RewardResult]) -> list[float]:
    return [r.score for r in results]


def score_here(reward: Reward, batch: list[RewardInput]) -> list[RewardResult]:
    """Score in this process (the plug-in's logic; the worker processes and budgets that
    the trainer's scoring goes through are tested with the accuracy reward and in
    tests/test_reward_bounds.py)."""
    results = [reward.score(s) for s in batch]
    for s, r in zip(batch, results, strict=True):
        reward.record(s, r)
    return results


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child that is not reaped yet is a zombie: dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# --------------------------------------------------------------------------- registry


def test_registry_lists_builtins_and_unknown_name_lists_them() -> None:
    assert {"accuracy", "format", "language", "code"} <= set(available_rewards())
    assert get_reward("format") is FormatReward
    with pytest.raises(ValueError) as info:
        get_reward("acuracy")
    msg = str(info.value)
    assert "acuracy" in msg
    for name in ("accuracy", "code", "format", "language"):
        assert name in msg


def test_register_custom_reward_and_conflicting_name() -> None:
    @register_reward("test_length")
    class LengthReward(Reward):
        def score(self, sample):  # type: ignore[no-untyped-def]
            return RewardResult(float(len(sample.response)))

    assert get_reward("test_length") is LengthReward
    with pytest.raises(ValueError, match="already registered"):

        @register_reward("test_length")
        class Other(Reward):
            def score(self, sample):  # type: ignore[no-untyped-def]
                return RewardResult(0.0)

    with pytest.raises(TypeError):
        register_reward("not_a_reward")(dict)  # type: ignore[arg-type]


def test_unknown_param_is_named_with_suggestion() -> None:
    with pytest.raises(ValueError) as info:
        LanguageReward({"taget": "zh"}, where="rewards.specs[2].params")
    msg = str(info.value)
    assert "rewards.specs[2].params.taget" in msg
    assert "rewards.specs[2].params.target" in msg  # the suggestion


def test_bad_param_type_and_value_are_named(sandbox_tools: None) -> None:
    with pytest.raises(ValueError, match=r"params\.mode: expected 'strict' \| 'lenient'"):
        FormatReward({"mode": "loose"})
    with pytest.raises(ValueError, match=r"params\.all_or_nothing: expected bool"):
        CodeReward({"all_or_nothing": "yes"})
    with pytest.raises(ValueError, match=r"params\.memory_mb: must be >= 32"):
        CodeReward({"memory_mb": 1})
    with pytest.raises(ValueError, match=r"params\.verify_fn: cannot import"):
        AccuracyReward({"verify_fn": "no_such_module_xyz:f"})
    assert CodeReward({"timeout_s": 2}).run_timeout_s == 2.0  # ints accepted for floats


# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"\boxed{1} then \boxed{ {2}^{3} }", " {2}^{3} "),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not nest
        (r"\boxed{7} and a truncated \boxed{\frac{1}{", "7"),
        (r"\fbox{x}", "x"),
        ("no box", None),
    ],
)
def test_last_boxed(text: str, expected: str | None) -> None:
    assert last_boxed(text) == expected


def test_answer_and_think_blocks() -> None:
    assert last_answer_block("<answer>1</answer> x <answer>2</answer>") == "2"
    assert last_answer_block("<answer>1") is None
    assert last_answer_block("</answer>") is None
    assert think_block("<think>a</think>b") == "a"
    assert think_block("a</think>b", prompt_ends_with_think=True) == "a"
    assert think_block("<think>truncated") == "truncated"
    assert think_block("plain") is None
    assert extract_final_answer(r"<answer>so \boxed{\frac{1}{2}}</answer>") == r"\frac{1}{2}"
    assert extract_final_answer("<answer> 42 </answer>") == "42"
    assert extract_final_answer(r"\boxed{42}") is None  # boxed outside an answer block


# --------------------------------------------------------------------------- accuracy


def test_math_verify_check_in_process() -> None:
    assert math_verify_check("0.5", r"\frac{1}{2}")
    assert math_verify_check("42", "42")
    assert math_verify_check(r"\sqrt{2}", "2^{1/2}")
    assert not math_verify_check("42", "43")
    assert not math_verify_check(r"\frac{1}{3}", "0.5")


@pytest.fixture(scope="module")
def accuracy() -> AccuracyReward:
    """One warm pool (2 workers, 1 s per check) shared by the accuracy tests."""
    reward = AccuracyReward({"verify_fn": FAULTY}, timeout_s=1.0, workers=2)
    reward([sample("1", "1")])  # start the workers outside the timed sections
    yield reward
    reward.close()


def test_accuracy_true_and_false(accuracy: AccuracyReward) -> None:
    batch = [
        sample(r"The answer is \boxed{\frac{1}{2}}", "0.5"),  # 1
        sample("42", "42"),  # 1
        sample(r"$\frac{3}{6}$", r"\frac{1}{2}"),  # 1
        sample("(1, 2)", "(1,2)"),  # 1
        sample("43", "42"),  # 0: wrong
        sample(r"\boxed{\frac{1}{3}}", "0.5"),  # 0: wrong
        sample(r"\boxed{41} no wait \boxed{42}", "42"),  # 1: the last box counts
        sample(None, "42"),  # 0: no answer block
        sample("42", None),  # 0: no ground truth
    ]
    before = accuracy.stats()
    results = accuracy(batch)
    assert scores(results) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert results[7].info == {"no_answer": True}
    assert "error" in results[8].info
    after = accuracy.stats()
    assert after["no_answer"] == before["no_answer"] + 1
    assert after["checks"] == before["checks"] + 7  # the two without inputs never ran
    assert after["timeouts"] == before["timeouts"]
    # Answers a reader accepts: currency signs, other scripts' digits, superscripts.
    edge = [sample(r"\$5", "5"), sample("٤٢", "42"), sample("４２", "42"), sample("7²", "49"),
            sample("72", "7²"), sample("½", "0.5"), sample("۳", "3")]
    assert scores(accuracy(edge)) == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0]


def test_unparsable_ground_truth_is_counted_and_named(accuracy: AccuracyReward,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    bad = RewardInput("q", "<answer>5</answer>", "\\boxed{", source="data/train.jsonl:7")
    before = accuracy.stats()["unparsable_ground_truth"]
    with caplog.at_level("WARNING", logger="r1mega.rewards.accuracy"):
        results = accuracy([bad, bad, sample("5", "5")])
    assert scores(results) == [0.0, 0.0, 1.0]
    assert results[0].info["unparsable_ground_truth"] is True
    assert accuracy.stats()["unparsable_ground_truth"] == before + 2
    warnings = [r.getMessage() for r in caplog.records if "data/train.jsonl:7" in r.getMessage()]
    assert len(warnings) == 1 and "cannot parse the ground truth" in warnings[0]  # once per row


def test_accuracy_hang_and_crash_do_not_stall_the_batch(accuracy: AccuracyReward) -> None:
    old_pids = accuracy.runner.worker_pids()
    assert len(old_pids) == 2
    before = accuracy.stats()
    restarts = accuracy.runner.restarts
    batch = [
        sample("42", "42"),
        sample("HANG", "42"),
        sample(r"\boxed{\frac{1}{2}}", "0.5"),
        sample("CRASH", "1"),
        sample("7", "8"),
        sample("9", "9"),
    ]
    results = accuracy(batch)

    assert scores(results) == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    assert results[1].info.get("timeout") is True
    assert "injected crash" in results[3].info["error"]
    after = accuracy.stats()
    assert after["timeouts"] == before["timeouts"] + 1
    assert after["errors"] == before["errors"] + 1
    assert accuracy.runner.restarts == restarts + 1
    # The hung worker (and only it) was killed and replaced, not left sleeping for 60 s.
    new_pids = accuracy.runner.worker_pids()
    gone = set(old_pids) - set(new_pids)
    assert len(gone) == 1 and not pid_alive(gone.pop())
    assert all(pid_alive(p) for p in new_pids)
    # The replacement keeps working.
    assert scores(accuracy([sample("5", "5"), sample("6", "5")])) == [1.0, 0.0]


def test_accuracy_dead_worker_is_blamed_alone(accuracy: AccuracyReward) -> None:
    deaths, errors = accuracy.runner.worker_deaths, accuracy.stats()["errors"]
    results = accuracy([sample("1", "1"), sample("DIE", "1"), sample("2", "2"),
                        sample("3", "3")])
    assert scores(results) == [1.0, 0.0, 1.0, 1.0]
    assert "died" in results[1].info["error"]
    assert accuracy.runner.worker_deaths == deaths + 1
    assert accuracy.stats()["errors"] == errors + 1


# --------------------------------------------------------------------------- format

GOOD = "<think>\nreasoning\n</think>\n<answer>42</answer>"
FORMAT_CASES = [
    # (response, strict, lenient)
    (GOOD, True, True),
    ("<think>r</think><answer>42</answer>", True, True),
    ("  " + GOOD + "\n", True, True),  # surrounding whitespace is not the policy's format
    ("<think>r</think>\n<answer>1</answer><answer>2</answer>", False, True),  # two answers
    ("<think>r</think><answer>42</answer> and more text", False, True),  # text after
    ("<answer>42</answer>", False, False),  # missing think
    ("preamble <think>r</think><answer>42</answer>", False, True),  # text before
    ("<think>a</think><think>b</think><answer>42</answer>", False, True),  # two thinks
    ("<think>r</think> middle <answer>42</answer>", False, True),  # text in between
    ("<answer>42</answer><think>r</think>", False, False),  # wrong order
    ("<think>r</think><answer>42", False, False),  # unclosed answer
    ("<think>r<answer>42</answer>", False, False),  # unclosed think
    ("", False, False),
]


@pytest.mark.parametrize(("response", "strict", "lenient"), FORMAT_CASES)
def test_format_strict_and_lenient(response: str, strict: bool, lenient: bool) -> None:
    assert format_ok(response, mode="strict") is strict
    assert format_ok(response, mode="lenient") is lenient


def test_format_reward_prompt_ends_with_think() -> None:
    inside = "reasoning\n</think>\n<answer>42</answer>"
    batch = [RewardInput("q", inside), RewardInput("q", GOOD)]
    assert scores(score_here(FormatReward({}), batch)) == [0.0, 1.0]
    # With the R1-Zero template the response starts inside the think block; repeating
    # <think> then makes two think tags.
    assert scores(score_here(FormatReward({"prompt_ends_with_think": True}), batch)) == [1.0, 0.0]
    lenient = FormatReward({"mode": "lenient", "prompt_ends_with_think": True})
    assert scores(score_here(lenient, batch)) == [1.0, 1.0]


# --------------------------------------------------------------------------- language


def test_words_definition() -> None:
    assert words("Let me compute 2+2=4, x². 我们 café") == [
        "Let", "me", "compute", "x", "我", "们", "café",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("cot", "en", "zh"),
    [
        # Let, me, compute, The, answer, is, four -> 7 English words of 7.
        ("Let me compute 2+2 = 4. The answer is four.", 7 / 7, 0 / 7),
        # 我 们 计 算 一 下 -> 6 ideographs, all Chinese.
        ("我们计算一下。", 0 / 6, 6 / 6),
        # First, 我, 们, compute, x, Then, 答, 案, is -> 5 English, 4 Chinese of 9.
        ("First, 我们 compute x². Then 答案 is 5.", 5 / 9, 4 / 9),
        # résumé is Latin but not ASCII: 3 English (the, is, fine) of 4.
        ("the résumé is fine", 3 / 4, 0 / 4),
        # こんにちは is one kana word, neither English nor Chinese; hello is English.
        ("hello こんにちは 你", 1 / 3, 1 / 3),
        ("1 + 2 = 3 !!!", 0.0, 0.0),  # no words
    ],
)
def test_language_fraction_against_hand_counts(cot: str, en: float, zh: float) -> None:
    assert language_fraction(cot, "en") == pytest.approx(en)
    assert language_fraction(cot, "zh") == pytest.approx(zh)
    response = f"<think>{cot}</think><answer>Answer 答案 is 3</answer>"  # answer ignored
    batch = [RewardInput("q", response)]
    assert score_here(LanguageReward({"target": "en"}), batch)[0].score == pytest.approx(en)
    assert score_here(LanguageReward({"target": "zh"}), batch)[0].score == pytest.approx(zh)


def test_language_reward_details() -> None:
    reward = LanguageReward({"target": "en", "prompt_ends_with_think": True})
    batch = [
        RewardInput("q", "think in English 中文</think><answer>x</answer>"),  # 3 of 5
        RewardInput("q", "中文</think>", metadata={"language": "zh"}),  # per-sample target
        RewardInput("q", "x", metadata={"language": "fr"}),  # unsupported target
    ]
    results = score_here(reward, batch)
    assert scores(results) == pytest.approx([3 / 5, 1.0, 0.0])
    assert "error" in results[2].info
    no_think = score_here(LanguageReward({}), [RewardInput("q", "<answer>hello</answer>")])[0]
    assert no_think.score == 0.0 and no_think.info == {"no_think": True}


# --------------------------------------------------------------------------- code

DOUBLE_TESTS = [
    {"input": "1\n", "output": "2\n"},
    {"input": "21\n", "output": "42"},
    {"input": "-3\n", "output": "-6\n"},
]


def code_sample(program: str, tests: list[dict[str, str]] = DOUBLE_TESTS) -> RewardInput:
    response = f"<think>easy</think><answer>\n```python\n{program}\n```\n</answer>"
    return RewardInput("q", response, metadata={"tests": tests})


def test_outputs_match_and_program_extraction() -> None:
    assert outputs_match("42  \n\n", "42")
    assert outputs_match("a \nb\t\n", "a\nb")
    assert not outputs_match(" 42", "42")  # leading whitespace matters
    assert not outputs_match("4\n2", "42")
    fenced = "<answer>Here:\n```py\nprint(1)\n```\nand\n```python\nprint(2)\n```</answer>"
    assert extract_program(fenced) == "print(2)\n"
    assert extract_program("<answer>print(3)</answer>") == "print(3)"
    assert extract_program("```python\nprint(4)\n```") is None  # not inside an answer


def test_code_reward_pass_fail_partial(sandbox_tools: None) -> None:
    reward = CodeReward({"timeout_s": 5}, workers=2)
    batch = [
        code_sample("print(int(input()) * 2)"),  # all 3 pass
        code_sample("print(int(input()) + 1)"),  # 1 + 1 = 2 passes the first test only
        code_sample("n = int(input())\nprint(n * 2 if n > 0 else 0)"),  # 2 of 3
        code_sample("raise SystemExit(1)"),  # runtime error
        RewardInput("q", "<think>x</think>", metadata={"tests": DOUBLE_TESTS}),  # no answer
        RewardInput("q", "<answer>print(1)</answer>", metadata={}),  # no tests
    ]
    results = score_here(reward, batch)
    assert scores(results) == pytest.approx([1.0, 1 / 3, 2 / 3, 0.0, 0.0, 0.0])
    assert results[1].info["tests"] == ["pass", "wrong", "wrong"]
    assert results[3].info["tests"] == ["runtime_error"] * 3
    assert results[4].info == {"no_answer": True}
    assert "error" in results[5].info
    strict = CodeReward({"all_or_nothing": True})
    assert scores(score_here(strict, batch[:3])) == [1.0, 0.0, 0.0]
    stats = reward.stats()
    assert stats["tests"] == 12 and stats["passed"] == 6 and stats["runtime_error"] == 3


def test_code_sandbox_limits(sandbox_tools: None) -> None:
    reward = CodeReward({"timeout_s": 1.0, "memory_mb": 512}, workers=2)
    one = [{"input": "", "output": "ok\n"}]
    batch = [
        code_sample("while True:\n    pass", one),
        code_sample("x = bytearray(2 * 1024**3)\nprint('ok')", one),
        code_sample("print('ok')", one),  # the limits leave room for a normal program
    ]
    results = score_here(reward, batch)
    assert results[0].score == 0.0 and results[0].info["tests"] == ["timeout"]
    assert results[0].info["timeout"] is True
    assert results[1].score == 0.0 and results[1].info["tests"] == ["memory"]
    assert "MemoryError" in results[1].info["stderr"]
    assert results[2].score == 1.0


# --------------------------------------------------------------------------- weighted sum


def test_weighted_sum_matches_hand_computation() -> None:
    cfg = OmegaConf.structured(
        RewardsConfig(
            specs=[
                RewardSpec(name="accuracy", weight=1.0),
                RewardSpec(name="format", weight=0.5, params={"mode": "strict"}),
                RewardSpec(name="language", weight=0.25, params={"target": "en"}),
            ],
            timeout_s=5.0,
            workers=2,
        )
    )
    batch = [
        # accuracy 1, format 1, language: Half, 中, 文 -> 1/3
        RewardInput("q", r"<think>Half 中文</think><answer>\boxed{\frac12}</answer>", "0.5"),
        # accuracy 0 (wrong), format 0 (text after), language 1
        RewardInput("q", "<think>think hard</think><answer>3</answer> bye", "4"),
        # accuracy 0 (no answer), format 0, language 0 (no think)
        RewardInput("q", "just 4", "4"),
    ]
    with RewardFunction.from_config(cfg) as fn:
        assert fn.names == ["accuracy", "format", "language"]
        total, per_reward = fn(batch)
        assert per_reward["accuracy"] == [1.0, 0.0, 0.0]
        assert per_reward["format"] == [1.0, 0.0, 0.0]
        assert per_reward["language"] == pytest.approx([1 / 3, 1.0, 0.0])
        expected = [1.0 + 0.5 + 0.25 / 3, 0.25, 0.0]
        assert total == pytest.approx(expected)
        stats = fn.stats()
        assert stats["accuracy/no_answer"] == 1 and stats["accuracy/checks"] == 2


def test_from_config_errors_name_the_key() -> None:
    def error(specs: list[dict[str, object]]) -> str:
        cfg = OmegaConf.create({"specs": specs, "timeout_s": 5.0, "workers": 2})
        with pytest.raises(ConfigError) as info:
            RewardFunction.from_config(cfg)
        return str(info.value)

    msg = error([{"name": "format"}, {"name": "acuracy"}])
    assert "rewards.specs[1].name" in msg
    assert all(n in msg for n in ("accuracy", "code", "format", "language"))
    msg = error([{"name": "format"}, {"name": "format", "weight": 2.0}])
    assert "rewards.specs[1].name" in msg and "rewards.specs[0]" in msg
    msg = error([{"name": "code", "params": {"memory": 256}}])
    assert "rewards.specs[0].params.memory" in msg and "memory_mb" in msg
    assert "empty" in error([])
