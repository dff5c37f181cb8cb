"""The Slurm path on a real (throw-away, two-node) Slurm cluster.

``tests/fixtures/slurm_cluster.sh`` starts Debian's slurmctld and two slurmds (n1, n2 on
127.0.0.1, own ports, auth/none) under a private directory; the tests submit real recipes
with ``sbatch``: the DeepSeek-R1-Zero 671B recipe ``slurm/r1_zero_671b.sh`` scaled down in
sizes only (tests/recipes.py; 2 nodes x 2 tasks), and ``slurm/r1_zero_tiny.sh`` for
preemption. So the launcher's MASTER_ADDR (from the controller's NodeAddr: n1 does not
resolve) and MASTER_PORT derivation, srun's ranks on both nodes, and preemption ->
checkpoint -> requeue -> resume are exercised for real.

The Slurm packages are installed with apt when missing (CI machines start bare); the
tests are skipped only where there is no apt-get to install them with.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from r1mega.checkpointing.train_state import find_latest_checkpoint
from r1mega.launch import free_port
from tests.distributed import ROOT
from tests.recipes import R1_ZERO_671B_SCALED, check_scaling

FIXTURE = ROOT / "tests" / "fixtures" / "slurm_cluster.sh"
RECIPE = "slurm/r1_zero_tiny.sh"
RECIPE_671B = "slurm/r1_zero_671b.sh"
# The 671B recipe's #SBATCH lines ask for 64 nodes x 8 GPUs x 8 tasks: the test cluster
# has 2 CPU nodes of 2 CPUs (sizes only, like the config overrides).
# The time limit must exceed the recipes' USR1 lead (#SBATCH --signal=USR1@1800): at 30
# minutes Slurm signals the job at its start, and on a loaded machine the signal arrived
# before the ranks installed their handler (2026-12-05).
SCALED_ALLOCATION = ["-N", "2", "--ntasks-per-node=2", "--gpus-per-node=0",
                     "--time=01:00:00"]
BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "squeue")
PACKAGES = ("slurmctld", "slurmd", "slurm-client")
FAST = ["rollout.max_new_tokens=8", "checkpoint.load=null"]  # random weights: fast


def _ensure_slurm() -> None:
    """Install Debian's Slurm when absent; skip only without apt-get."""
    if all(shutil.which(b) for b in BINARIES):
        return
    if shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and there is no apt-get to install it with")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    missing = [b for b in BINARIES if shutil.which(b) is None]
    assert not missing, f"installed {PACKAGES} but still missing {missing}"


class Cluster:
    """A running two-node cluster: its directory and the environment for clients."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(var, None)
        self.env = {**env, "SLURM_CONF": str(directory / "slurm.conf"),
                    "R1MEGA_PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
                    "PYTHONWARNINGS": "ignore"}

    def run(self, *cmd: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                              env={**self.env, **env})

    def diagnostics(self, log: Path | None = None) -> str:
        parts = []
        if log is not None and log.exists():
            parts.append(f"--- {log.name} ---\n{log.read_text()[-8000:]}")
        for name in ("slurmctld.log", "slurmd-n1.log", "slurmd-n2.log"):
            path = self.dir / "log" / name
            if path.exists():
                parts.append(f"--- {name} ---\n{path.read_text()[-2000:]}")
        return "\n".join(parts)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    _ensure_slurm()
    directory = tmp_path_factory.mktemp("slurm")
    ports = [str(free_port()) for _ in range(3)]
    with open(directory / "fixture.log", "w") as out:
        start = subprocess.run(["bash", str(FIXTURE), "start", str(directory), *ports],
                               stdout=out, stderr=subprocess.STDOUT, timeout=120)
    if start.returncode != 0:
        pytest.fail("the Slurm fixture did not start:\n" + (directory / "fixture.log").read_text())
    try:
        yield Cluster(directory)
    finally:
        subprocess.run(["bash", str(FIXTURE), "stop", str(directory)], capture_output=True,
                       timeout=120)


def _step_lines(text: str) -> list[str]:
    return [line.split(" | ")[0] for line in text.splitlines() if line.startswith("step ")]


def test_scaled_671b_recipe_on_two_nodes(cluster: Cluster, recipe_inputs: list[str],
                                         tmp_path: Path) -> None:
    """sbatch the DeepSeek-R1-Zero 671B recipe, scaled down in sizes only, on 2 nodes x 2
    tasks: the ranks start on both nodes, meet at the launcher's MASTER_ADDR:MASTER_PORT
    and run an RL step of the recipe (TP 2 x PP 2 x EP 2, 4 minibatches, MTP...)."""
    overrides = [*R1_ZERO_671B_SCALED, *recipe_inputs,
                 f"checkpoint.save_dir={tmp_path / 'ckpt'}"]
    check_scaling(overrides)
    out = cluster.run(
        "sbatch", "--wait", "--parsable", *SCALED_ALLOCATION, f"--output={tmp_path}/%x-%j.out",
        RECIPE_671B, "train.steps=1", *overrides,
        timeout=600, R1MEGA_REQUEUE_MARKER=str(tmp_path / "requeue"))
    job_id = out.stdout.strip().split(";")[0]
    log = tmp_path / f"r1-zero-671b-{job_id}.out"
    assert out.returncode == 0, f"{out.stderr}\n{cluster.diagnostics(log)}"
    text = log.read_text()
    assert "rank 0/4 on node n1" in text and "rank 3/4 on node n2" in text, text
    # n1 does not resolve: the launcher took its NodeAddr; the port is 20000 + id % 20000.
    assert f"rendezvous 127.0.0.1:{20000 + int(job_id) % 20000}" in text, text
    assert "4 process(es) via slurm; train layout TP=2 PP=2 CP=1 EP=2" in text, text
    assert _step_lines(text) == ["step 1/1"], text
    assert find_latest_checkpoint(tmp_path / "ckpt") is not None
    assert not (tmp_path / "requeue").exists()


def _trainer_integrated() -> bool:
    return "PreemptionHandler" in (ROOT / "r1mega" / "trainer.py").read_text()


@pytest.mark.xfail(not _trainer_integrated(), strict=True,
                   reason="trainer integration pending: r1mega/trainer.py does not call "
                          "r1mega.preemption.PreemptionHandler yet")
def test_usr1_checkpoints_requeues_and_resumes(cluster: Cluster, tmp_path: Path) -> None:
    """`scancel --signal=USR1` mid-run: the ranks finish the step, checkpoint and exit 75;
    the launcher requeues the job (same id) and the next run resumes from that checkpoint,
    continuing the step numbering to the end."""
    steps = 4
    save_dir = tmp_path / "ckpt"
    marker = tmp_path / "requeue"
    cmd = ["sbatch", "--wait", "--parsable", "-N", "2", f"--output={tmp_path}/%x-%j.out",
           RECIPE, f"train.steps={steps}", *FAST, f"checkpoint.save_dir={save_dir}"]
    sbatch = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT, env={**cluster.env, "R1MEGA_REQUEUE_MARKER": str(marker)})
    job_id = ""
    try:
        assert sbatch.stdout is not None
        job_id = sbatch.stdout.readline().strip().split(";")[0]  # --parsable prints it first
        log = tmp_path / f"r1-zero-tiny-{job_id}.out"
        deadline = time.monotonic() + 180
        while not (log.exists() and "step 1/" in log.read_text()):
            assert sbatch.poll() is None, f"job ended before step 1\n{cluster.diagnostics(log)}"
            assert time.monotonic() < deadline, f"no step 1 in 180 s\n{cluster.diagnostics(log)}"
            time.sleep(0.5)
        signal = cluster.run("scancel", "--signal=USR1", job_id)
        assert signal.returncode == 0, signal.stderr
        _, err = sbatch.communicate(timeout=240)
    finally:
        if sbatch.poll() is None:
            cluster.run("scancel", job_id)
            sbatch.kill()
    text = log.read_text()
    assert sbatch.returncode == 0, f"{err}\n{cluster.diagnostics(log)}"

    first, _, second = text.partition("preempted after a checkpoint")
    assert second, f"the launcher never saw the preemption\n{text}"
    assert f"requeueing job {job_id}" in second and "run 2:" in second, text
    match = re.search(r"resumed from \S+step_(\d{8}) \(step (\d+)\)", second)
    assert match and int(match.group(1)) == int(match.group(2)), text
    stopped = int(match.group(2))
    assert 1 <= stopped < steps, text
    # Every step trained exactly once across the two runs, numbering continued.
    assert _step_lines(first) == [f"step {i}/{steps}" for i in range(1, stopped + 1)], text
    assert _step_lines(second) == [f"step {i}/{steps}" for i in range(stopped + 1, steps + 1)]
    latest = find_latest_checkpoint(save_dir)
    assert latest is not None and latest.name == f"step_{steps:08d}"
    assert not marker.exists()


def test_scripts_pass_shellcheck() -> None:
    """The launcher, recipes and fixture lint clean (sbatch lines are comments to it)."""
    if shutil.which("shellcheck") is None:
        if shutil.which("apt-get") is None:
            pytest.skip("shellcheck is not installed and there is no apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends",
                        "shellcheck"], capture_output=True, env=env, timeout=600, check=True)
    scripts = sorted(str(p) for p in (ROOT / "slurm").glob("*.sh")) + [str(FIXTURE)]
    out = subprocess.run(["shellcheck", "-x", *scripts], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_launcher_outside_an_allocation_says_how_to_submit() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run(["bash", "slurm/launch.sh", "configs/tiny_cpu.yaml"], cwd=ROOT,
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2
    assert "not inside a Slurm allocation" in out.stderr and "sbatch" in out.stderr
