"""Built-in cold-start SFT data for the arithmetic task (no download needed).

DeepSeek-R1 starts RL from a model fine-tuned on a few thousand readable chains of
thought (the "cold start"), so that RL begins from a model that already writes its
reasoning in a fixed, readable layout. For the tiny CPU configs and the tests this module
writes such rows for r1mega's built-in ``arithmetic`` problems
(:func:`r1mega.data.tasks.arithmetic`): a short chain of thought inside ``<think>``
followed by the answer block as the summary, i.e. exactly the R1-Zero layout the strict
``format`` reward checks, so a model fine-tuned on them enters RL with the format.

Every ``unreadable_every``-th row is deliberately unreadable, cycling through the reasons
the readability filter knows (:mod:`r1mega.data.readability`): no think block, no summary
after it, mixed English/Chinese, far too long. They give ``sft.filter_readability``
something to drop and count; ``kind`` in each row says which it is.

Two ways to use it:

* ``sft.train_path: builtin:coldstart_arithmetic`` -- :data:`BUILTIN_SIZE` rows generated
  in memory from ``train.seed`` (every rank generates the same rows);
* ``python -m r1mega.sft.coldstart OUT.jsonl [--n N] [--seed S]`` -- the same rows as a
  JSONL file (``prompt``, ``response``, ``answer``, ``kind``) to inspect or to edit.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from r1mega.data.prompts import PromptExample
from r1mega.data.tasks import arithmetic

BUILTIN_COLDSTART = "builtin:coldstart_arithmetic"
BUILTIN_SIZE = 64
UNREADABLE_KINDS = ("no_think", "no_summary", "mixed_language", "too_long")
DEFAULT_UNREADABLE_EVERY = 8


def is_builtin_coldstart(path: str | None) -> bool:
    return path == BUILTIN_COLDSTART


def _parse(expression: str) -> tuple[int, str, int]:
    a, op, b = expression.split(" ")
    return int(a), op, int(b)


def reasoning(expression: str, value: int) -> str:
    """A short, checkable chain of thought for ``a op b = value``, in plain English."""
    a, op, b = _parse(expression)
    if op == "+":
        work, check = f"Adding {b} to {a} gives {value}.", f"{value} - {b} = {a}"
    elif op == "-":
        work, check = f"Taking {b} away from {a} leaves {value}.", f"{value} + {b} = {a}"
    else:
        work = f"Multiplying {a} by {b} gives {value}."
        check = f"{value} / {b} = {a}" if b else "any number times 0 is 0"
    return f"The question asks for {expression}. {work} Check: {check}, so this is right."


def readable_response(expression: str, value: int) -> str:
    """Reasoning in ``<think>``, then the answer block as the reader's summary."""
    return f" <think> {reasoning(expression, value)} </think> <answer> {value} </answer>"


def unreadable_response(kind: str, expression: str, value: int) -> str:
    """A response the readability filter rejects for ``kind``."""
    if kind == "no_think":
        return f" {expression} is {value}. <answer> {value} </answer>"
    if kind == "no_summary":
        return f" <think> {reasoning(expression, value)} </think>"
    if kind == "mixed_language":
        return (f" <think> The question asks for {expression}. 我们一步一步地计算，"
                f"结果是 {value}。 </think> <answer> {value} </answer>")
    if kind == "too_long":
        rambling = " ".join(["Let me check that once more to be completely sure."] * 12)
        return (f" <think> {reasoning(expression, value)} {rambling} </think> "
                f"<answer> {value} </answer>")
    raise ValueError(f"unknown unreadable kind {kind!r}: expected one of {UNREADABLE_KINDS}")


def coldstart_rows(n: int, seed: int,
                   unreadable_every: int = DEFAULT_UNREADABLE_EVERY) -> list[dict[str, Any]]:
    """``n`` rows ``{"prompt", "response", "answer", "kind"}`` for arithmetic problems.

    Row ``i`` is unreadable when ``(i + 1) % unreadable_every == 0`` (0 = never), its kind
    cycling through :data:`UNREADABLE_KINDS`; the others are readable.
    """
    rows = []
    for i, ex in enumerate(arithmetic(n, seed=seed)):
        expression, value = ex.metadata["expression"], int(ex.answer or 0)
        if unreadable_every and (i + 1) % unreadable_every == 0:
            kind = UNREADABLE_KINDS[((i + 1) // unreadable_every - 1) % len(UNREADABLE_KINDS)]
            response = unreadable_response(kind, expression, value)
        else:
            kind, response = "readable", readable_response(expression, value)
        rows.append({"prompt": ex.prompt, "response": response, "answer": ex.answer,
                     "kind": kind})
    return rows


def builtin_coldstart_examples(seed: int, n: int = BUILTIN_SIZE) -> list[PromptExample]:
    """The rows of ``builtin:coldstart_arithmetic`` as the SFT data loader sees file rows:
    the response in ``answer`` (the loader's response field), the rest in ``metadata``."""
    return [PromptExample(index=i, prompt=row["prompt"], answer=row["response"],
                          metadata={"answer": row["answer"], "kind": row["kind"]},
                          source=f"{BUILTIN_COLDSTART}#{seed}:{i}")
            for i, row in enumerate(coldstart_rows(n, seed))]


def write_jsonl(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write ``rows`` as JSON lines (UTF-8, one object per line)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m r1mega.sft.coldstart",
                                     description="Write cold-start SFT rows for the "
                                                 "built-in arithmetic task as JSONL.")
    parser.add_argument("output", help="JSONL file to write")
    parser.add_argument("--n", type=int, default=BUILTIN_SIZE, help="rows")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--unreadable-every", type=int, default=DEFAULT_UNREADABLE_EVERY,
                        help="every k-th row is unreadable (0: none)")
    args = parser.parse_args(argv)
    rows = coldstart_rows(args.n, args.seed, args.unreadable_every)
    path = write_jsonl(args.output, rows)
    unreadable = sum(row["kind"] != "readable" for row in rows)
    print(f"wrote {len(rows)} rows ({unreadable} deliberately unreadable) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
