"""A tiny job for the lifetime tests, started by the real local launcher
(:func:`r1mega.launch.relaunch_local` with ``module="tests.workers.lifetime_job"``).

Every rank runs under :func:`r1mega.launch.run_rank` as the trainer's ranks do, joins a
gloo process group and keeps all-reducing. With ``--rewards`` rank 0 holds reward scoring
workers and first scores a batch in which one sample hangs, so a worker has been killed
and replaced; with ``--wandb`` it holds an offline W&B run and its service process. Then:

* ``run``: all ranks all-reduce until killed;
* ``crash R``: rank R raises ``ValueError`` while the others wait in an all-reduce.

Each rank prints ``rank N ready pid P`` once it is running.
"""

from __future__ import annotations

import os
import sys
import time

from r1mega.launch import run_rank
from r1mega.rewards import Reward, RewardInput, RewardResult, register_reward

HANG = "HANG"


@register_reward("test_lifetime_sleepy")
class Sleepy(Reward):
    """Scores 1, after sleeping for good on ``HANG``."""

    def score(self, sample: RewardInput) -> RewardResult:
        if sample.response == HANG:
            time.sleep(3600)
        return RewardResult(1.0)


def job(argv: list[str]) -> None:
    import torch
    import torch.distributed as dist

    from r1mega.rewards import RewardFunction

    mode = argv[0]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    rewards = None
    if rank == 0 and "--rewards" in argv:
        rewards = RewardFunction.from_config({"specs": [{"name": "test_lifetime_sleepy"}],
                                              "workers": 1, "timeout_s": 1.0})
        total, _ = rewards([RewardInput("q", "ok"), RewardInput("q", HANG)])
        assert total == [1.0, 0.0], total
        assert rewards.stats()["workers/restarts"] == 1
        if "--wandb" in argv:
            import wandb

            wandb.init(project="r1mega-lifetime", mode="offline", dir=os.environ["WANDB_DIR"])
    dist.barrier()
    print(f"rank {rank} ready pid {os.getpid()}", flush=True)
    value = torch.zeros(1)
    if mode == "crash" and rank == int(argv[1]):
        time.sleep(0.5)  # the others are waiting in the all-reduce below
        raise ValueError(f"boom from rank {rank}")
    while True:
        dist.all_reduce(value)
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(run_rank(lambda: job(sys.argv[1:])))
