"""The README's walk through the four stages of the R1 pipeline runs, command by command.

The commands are read from the README itself (the block under "The four stages on the
tiny CPU setup"), so the documentation cannot drift from what works. They run in a fresh
directory holding links to the repository's configs and tools, as a new user would run
them from a checkout (with the tiny base model already pretrained, by the session's
fixture). Every job starts its 2 processes itself (``--nproc 2``); the reward model of the
second RL stage and the distilled student are Hugging Face directories, each converted
once by the job that loads it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests.distributed import ROOT

HEADING = "### The four stages on the tiny CPU setup"


def walk_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index(HEADING):]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "no bash block under the walk heading"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_walk_runs_end_to_end(tmp_path: Path, tiny_base_model: Path) -> None:
    for name in ("configs", "tools"):
        (tmp_path / name).symlink_to(ROOT / name)
    # The tiny base model the configs start from (warm_start:runs/tiny_base), pretrained
    # once per session by the fixture instead of on first use here.
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tiny_base").symlink_to(tiny_base_model)
    before = (tiny_base_model / "meta.json").read_text()
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
           "WANDB_MODE": "offline"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    commands = walk_commands()
    assert [shlex.split(c)[:2] for c in commands] == [
        ["python", "tools/make_tiny_reward_model.py"], ["python", "tools/make_tiny_hf_model.py"],
        ["r1mega", "sft"], ["r1mega", "train"], ["r1mega", "sample"], ["r1mega", "sft"],
        ["r1mega", "train"], ["r1mega", "distill"]]
    outputs = []
    for command in commands:
        argv = shlex.split(command)
        if argv[0] == "python":
            argv[0] = sys.executable
        else:
            assert argv[-2:] == ["--nproc", "2"], command
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        outputs.append(proc.stdout)
    for out in outputs[2:]:
        assert "[r1mega] 2 process(es) via torchrun" in out
    stage2, student = outputs[6], outputs[7]
    assert stage2.count("[r1mega] converting models/tiny-reward-model") == 1
    assert "reward model from runs/walk/stage2/hf_cache/tiny-reward-model-" in stage2
    assert student.count("[r1mega] converting models/tiny-qwen2") == 1
    assert "model qwen2 (2 layers, hidden 64)" in student
    assert (tiny_base_model / "meta.json").read_text() == before  # reused, not retrained
    walk = tmp_path / "runs" / "walk"
    for stage in ("coldstart", "rl", "sft", "stage2", "student"):
        assert (walk / stage / "latest").exists(), stage
    stats = json.loads((walk / "samples" / "stats.json").read_text())
    rows = (walk / "samples" / "dataset.jsonl").read_text().splitlines()
    assert stats["complete"] and stats["kept"] == len(rows) > 0
