"""How long the rule rewards take when a check hangs or a program misbehaves.

The tests assert what happens (a hung math-verify check times out and its worker is
replaced; a looping or memory-hungry program is stopped at its limit); this measures what
it costs, against a clean batch of the same size in the same run:

* accuracy: a batch of genuine math-verify checks, and the same batch with one check that
  hangs (its worker sleeps 60 s): the hang should cost about ``timeout_s`` plus one pool
  restart, not the 60 s;
* code: three programs (an endless loop, a 2 GiB allocation, a normal one) under a 1 s /
  512 MiB sandbox, against three normal programs.

Both go through :class:`r1mega.rewards.RewardFunction` and its scoring workers, as the
trainer's rewards do.

    python bench/bench_rewards.py [--out bench/results/rewards.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_common import environment  # noqa: E402

HANG = "bench.bench_rewards:verify_or_hang"


def verify_or_hang(gold: str, pred: str) -> bool:
    """``verify_fn`` of the benchmark's workers: math-verify, except on ``HANG``."""
    from r1mega.rewards import math_verify_check

    if pred == "HANG":
        time.sleep(60)
    return math_verify_check(gold, pred)


def _sample(answer: str, gold: str):
    from r1mega.rewards import RewardInput

    return RewardInput(prompt="q", response=f"<think>\nw\n</think>\n<answer>{answer}</answer>",
                       answer=gold)


def _code_sample(program: str):
    from r1mega.rewards import RewardInput

    response = f"<think>w</think><answer>\n```python\n{program}\n```\n</answer>"
    return RewardInput("q", response, metadata={"tests": [{"input": "", "output": "ok\n"}]})


def _timed(fn, batch) -> float:
    start = time.perf_counter()
    fn.evaluate(batch)
    return time.perf_counter() - start


def _reward_function(spec: dict):
    from r1mega.rewards import RewardFunction

    return RewardFunction.from_config({"specs": [spec], "timeout_s": 1.0, "workers": 2})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "rewards.json"))
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    rows = []
    clean = [_sample(str(i % 7), str(i % 5)) for i in range(args.batch)]
    with _reward_function({"name": "accuracy", "params": {"verify_fn": HANG}}) as accuracy:
        accuracy.evaluate(clean[:2])  # start and warm the workers (imports)
        base = _timed(accuracy, clean)
        hung = _timed(accuracy, [*clean[:-1], _sample("HANG", "1")])
    rows.append({"case": "accuracy, one hung check", "seconds": hung, "baseline_seconds": base,
                 "timeout_s": 1.0})
    normal = [_code_sample("print('ok')")] * 3
    faulty = [_code_sample("while True:\n    pass"),
              _code_sample("x = bytearray(2 * 1024**3)\nprint('ok')"),
              _code_sample("print('ok')")]
    with _reward_function({"name": "code", "params": {"timeout_s": 1.0,
                                                      "memory_mb": 512}}) as code:
        code.evaluate(normal[:1])
        base = _timed(code, normal)
        limits = _timed(code, faulty)
    rows.append({"case": "code, loop + memory hog + normal", "seconds": limits,
                 "baseline_seconds": base, "timeout_s": 1.0})
    print(f"{'case':<36} {'seconds':>8} {'clean batch':>12} {'ratio':>7}")
    for r in rows:
        r["ratio"] = r["seconds"] / max(r["baseline_seconds"], 1e-9)
        print(f"{r['case']:<36} {r['seconds']:>8.2f} {r['baseline_seconds']:>12.2f} "
              f"{r['ratio']:>7.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**environment(), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
