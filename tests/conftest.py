"""Shared fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.distributed import ROOT

# The session's tiny base models, each pretrained by the documented tool (as a fresh
# clone's first run would) and keyed by the fixture that returns it.
BASE_MODEL_CONFIGS = {
    "tiny_base_model": "configs/tiny_cpu.yaml",
    "count_on_base_model": "configs/r1_zero_tiny_cpu.yaml",
}


@pytest.fixture(scope="session", autouse=True)
def _base_models_pretraining(request: pytest.FixtureRequest,
                             tmp_path_factory: pytest.TempPathFactory
                             ) -> Iterator[dict[str, Future[Path]]]:
    """Starts pretraining the base models the collected tests need as the session starts,
    one at a time in a background process, so that its minutes on one core overlap the
    tests before the first one that needs it (CI's machine has two cores) instead of
    adding to them. Processes still running when the session ends are killed."""
    order: dict[str, int] = {}
    for index, item in enumerate(request.session.items):
        for name in BASE_MODEL_CONFIGS:
            if name in getattr(item, "fixturenames", ()):
                order.setdefault(name, index)
    running: list[subprocess.Popen[str]] = []
    ended = threading.Event()

    def pretrain(config: str, out: Path) -> Path:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(key, None)
        if ended.is_set():
            raise RuntimeError("the test session ended before pretraining started")
        proc = subprocess.Popen([sys.executable, "tools/pretrain_tiny.py", config, "--out",
                                 str(out)], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        running.append(proc)
        stdout, stderr = proc.communicate(timeout=1800)
        if proc.returncode != 0 or not (out / "meta.json").is_file():
            raise RuntimeError(f"pretraining {config} failed ({proc.returncode}):\n"
                               f"{stdout[-3000:]}\n{stderr[-5000:]}")
        return out

    with ThreadPoolExecutor(max_workers=1) as pool:
        futures = {name: pool.submit(pretrain, BASE_MODEL_CONFIGS[name],
                                     tmp_path_factory.mktemp(f"{name}_pretrained"))
                   for name in sorted(order, key=order.__getitem__)}
        yield futures
        ended.set()
        for future in futures.values():
            future.cancel()
        for proc in running:
            if proc.poll() is None:
                proc.kill()


def _pretrained(futures: dict[str, Future[Path]], name: str) -> Path:
    try:
        return futures[name].result()
    except RuntimeError as error:
        pytest.fail(str(error))


@pytest.fixture(scope="session")
def tiny_base_model(_base_models_pretraining: dict[str, Future[Path]]) -> Path:
    """The tiny base model of ``configs/tiny_cpu.yaml`` (about three CPU minutes to
    pretrain) for the tests that start from it; a run given
    ``checkpoint.load=warm_start:DIR`` finds it cached."""
    return _pretrained(_base_models_pretraining, "tiny_base_model")


@pytest.fixture(scope="session")
def count_on_base_model(_base_models_pretraining: dict[str, Future[Path]]) -> Path:
    """The tiny base model of ``configs/r1_zero_tiny_cpu.yaml`` (``builtin:count_on``,
    about five CPU minutes to pretrain)."""
    return _pretrained(_base_models_pretraining, "count_on_base_model")


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
