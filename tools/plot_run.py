#!/usr/bin/env python3
"""Plot the reward and response-length curves of an r1mega run from its offline W&B run.

    python tools/plot_run.py runs/r1_zero_tiny_cpu --out tools/figures/r1_zero_tiny_cpu_curves.png

The argument is a W&B offline run directory (``.../wandb/offline-run-*``), or any
directory above one (a run's ``logging.wandb_dir``, by default the parent of
``checkpoint.save_dir``: ``runs/r1_zero_tiny_cpu``); with several runs there, the newest is used.
The run is read back with ``wandb leet inspect --json`` (no network, no W&B account), as
``tests/test_cli.py`` does, and the PNG gets two panels over the RL steps: the rewards
(``reward/mean``, ``reward/accuracy``, ``reward/format``) and the mean response length
(``rollout/response_length``, with its maximum when it was logged); a run with held-out
evaluation (``eval.interval``) adds its pass@1 and mean response length, R1's curves,
from the step-0 point on. Needs matplotlib
(``pip install -e '.[dev]'``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REWARDS = (("reward/mean", "reward (weighted sum)"), ("reward/accuracy", "accuracy (rollouts)"),
           ("reward/format", "format (rollouts)"))
LENGTH, LENGTH_MAX = "rollout/response_length", "rollout/response_length_max"
# the run's held-out evaluation (eval.interval > 0): R1's curves
EVAL_PASS, EVAL_LENGTH = "eval/pass_at_1", "eval/response_length"


def find_run(path: Path) -> Path:
    """The offline run directory ``path`` names or contains (the newest one)."""
    if path.name.startswith("offline-run-"):
        return path
    runs = sorted(path.glob("offline-run-*")) or sorted(path.glob("wandb/offline-run-*"))
    if not runs:
        raise FileNotFoundError(f"no W&B offline run (offline-run-*) in {path} or "
                                f"{path / 'wandb'}")
    return runs[-1]


def wandb_cli() -> str:
    """The ``wandb`` executable beside this interpreter (a venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "wandb"
    if beside.exists():
        return str(beside)
    found = shutil.which("wandb")
    if found is None:
        raise FileNotFoundError("the wandb command is not installed")
    return found


def read_history(run_dir: Path) -> list[dict]:
    """The run's history rows (one per logged step), as ``wandb leet inspect`` prints them."""
    out = subprocess.run([wandb_cli(), "leet", "inspect", "--json", str(run_dir)],
                         capture_output=True, text=True, timeout=300, check=True)
    return [record["history"]["item"] for record in map(json.loads, out.stdout.splitlines())
            if record.get("type") == "history"]


def curves(history: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """(steps, values) of every plotted metric present in ``history``; the step is
    ``train/step`` when logged, else W&B's ``_step``."""
    result: dict[str, tuple[list[float], list[float]]] = {}
    for key in [k for k, _ in REWARDS] + [LENGTH, LENGTH_MAX, EVAL_PASS, EVAL_LENGTH]:
        points = [(float(row.get("train/step", row.get("_step", i))), float(row[key]))
                  for i, row in enumerate(history) if row.get(key) is not None]
        if points:
            points.sort()
            result[key] = ([s for s, _ in points], [v for _, v in points])
    return result


def plot(data: dict[str, tuple[list[float], list[float]]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    missing = [k for k in ("reward/mean", LENGTH) if k not in data]
    if missing:
        raise ValueError(f"the run logged no {', '.join(missing)}")
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, dpi=80)
    for (key, label), style in zip(REWARDS, ("-", "--", ":"), strict=True):
        if key in data:
            top.plot(*data[key], style, marker="o", markersize=2.5, label=label,
                     linewidth=2 if key == "reward/mean" else 1.4)
    if EVAL_PASS in data:
        top.plot(*data[EVAL_PASS], "-", color="black", marker="s", markersize=4,
                 linewidth=2.2, label="held-out pass@1")
    top.set_ylabel("reward / rate")
    top.set_ylim(0.0, max(1.55, max(data["reward/mean"][1]) + 0.05))
    top.legend(loc="upper left", fontsize=8, ncol=3)
    top.grid(alpha=0.3)
    bottom.plot(*data[LENGTH], "-", marker="o", markersize=2.5, label="mean (rollouts)")
    if EVAL_LENGTH in data:
        bottom.plot(*data[EVAL_LENGTH], "-", color="black", marker="s", markersize=4,
                    linewidth=2.2, label="mean (held-out evaluation)")
    if LENGTH_MAX in data:
        bottom.plot(*data[LENGTH_MAX], ":", color="gray", label="max")
    bottom.set_ylabel("response length (tokens)")
    bottom.set_xlabel("RL step")
    bottom.legend(loc="lower right", fontsize=8)
    bottom.grid(alpha=0.3)
    top.set_title(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="offline-run-* directory, or a directory "
                        "above one (e.g. runs/r1_zero_tiny_cpu)")
    parser.add_argument("--out", type=Path,
                        default=Path("tools/figures/r1_zero_tiny_cpu_curves.png"))
    parser.add_argument("--title", default=None, help="default: the run directory's name")
    args = parser.parse_args(argv)
    run_dir = find_run(args.run)
    data = curves(read_history(run_dir))
    plot(data, args.out, args.title or f"r1mega GRPO: {run_dir.name}")
    steps = len(data["reward/mean"][0])
    print(f"{args.out}: {steps} steps from {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
