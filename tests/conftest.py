"""Shared fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import ROOT


def _pretrained_base(tmp_path_factory: pytest.TempPathFactory, config: str) -> Path:
    """``config``'s tiny base model (``warm_start:DIR``), pretrained with the documented
    tool into a fresh directory, as a fresh clone's first run would."""
    out = tmp_path_factory.mktemp(Path(config).stem + "_base")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "tools/pretrain_tiny.py", config, "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert (out / "meta.json").is_file()
    return out


@pytest.fixture(scope="session")
def tiny_base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base model of ``configs/tiny_cpu.yaml``, pretrained once per test session
    (about three CPU minutes) for the tests that start from it; a run given
    ``checkpoint.load=warm_start:DIR`` finds it cached."""
    return _pretrained_base(tmp_path_factory, "configs/tiny_cpu.yaml")


@pytest.fixture(scope="session")
def count_on_base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base model of ``configs/r1_zero_tiny_cpu.yaml`` (``builtin:count_on``),
    pretrained once per test session (about five CPU minutes)."""
    return _pretrained_base(tmp_path_factory, "configs/r1_zero_tiny_cpu.yaml")


SANDBOX_TOOLS = {"bwrap": "bubblewrap", "setpriv": "util-linux", "prlimit": "util-linux"}


@pytest.fixture(scope="session")
def sandbox_tools() -> None:
    """What the code reward's sandbox needs (bubblewrap; util-linux's setpriv and
    prlimit), installed from Debian's packages when absent, as ``.ci/run`` does; without
    them and without apt-get the tests that run programs fail with the install hint."""
    import shutil

    missing = sorted({pkg for tool, pkg in SANDBOX_TOOLS.items() if not shutil.which(tool)})
    if not missing:
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.fail(f"the code sandbox needs {', '.join(missing)}: "
                    f"apt-get install --no-install-recommends {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


@pytest.fixture(scope="session")
def recipe_inputs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Tokenizer and dataset overrides for the shipped GPU recipes scaled down
    (tests/recipes.py): a tiny byte-level BPE tokenizer and a JSONL prompt set."""
    from tests.recipes import write_inputs

    tokenizer, data = write_inputs(tmp_path_factory.mktemp("recipe_inputs"))
    return [f"tokenizer.path={tokenizer}", f"data.train_path={data}"]
