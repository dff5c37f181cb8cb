"""Scoring worker processes: every reward of every sample under a hard time budget.

A reward is code running on model output, and one slow sample on rank 0 stalls every
rank. A thread cannot be stopped and a signal cannot interrupt C code (a regular
expression, a huge sympy power), so the only hard bound is a process that can be killed.
:class:`RewardRunner` therefore scores in ``workers`` worker processes, one sample of one
reward at a time per worker, with a deadline per sample (``Reward.budget_s``) counted
from the moment the sample is handed over:

* a sample past its deadline scores 0 with ``{"timeout": True}``; its worker is killed
  and replaced, the other workers carry on;
* a sample whose reward raises scores 0 with ``{"error": ...}``;
* a worker that dies (segfault, ``os._exit``) blames exactly the sample it was scoring
  (one sample per worker at a time), which scores 0 with an error; a replacement starts.

Workers are started with the ``spawn`` method (forking a process that holds CUDA
contexts and NCCL threads is unsafe), receive the reward plug-ins once, let each warm up
(:meth:`Reward.prepare_worker`: math-verify imports sympy and builds its grammar) and
report ready before their first sample, so no deadline is spent on start-up. They die
with the process that started them (``PR_SET_PDEATHSIG``).

The runner talks to each worker over its own pipe and holds no threads, queues or
executor: closing it (or the interpreter exiting) kills the workers and joins them, and
there is nothing left to wait for. (A ``ProcessPoolExecutor`` recycled after timeouts
kept a feeder thread blocked writing a large sample into the pipe of a killed worker,
and the interpreter then hung at exit joining it.)
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from r1mega.rewards.base import Reward, RewardInput, RewardResult
from r1mega.utils.process import die_with_parent

__all__ = ["RewardRunner"]

DIED = "scoring worker process died"

# ----------------------------------------------------------------------------- worker side


def _worker_main(conn: Connection, rewards: list[Reward], index: int) -> None:
    """A scoring worker: warm up, report ready, then score ``(reward, sample)`` jobs."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        for reward in rewards:
            reward.prepare_worker(index)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises
        conn.send(("failed", f"{type(e).__name__}: {e}"[:1000]))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        reward_index, sample = job
        conn.send(("result", _score_one(rewards[reward_index], sample)))


def _score_one(reward: Reward, sample: RewardInput) -> RewardResult:
    """``reward.score(sample)``, never raising: errors and timeouts become zero scores."""
    try:
        result = reward.score(sample)
        if not isinstance(result, RewardResult):
            raise TypeError(f"score() returned {type(result).__name__}, not RewardResult")
        return result
    except TimeoutError as e:
        return RewardResult(0.0, {"timeout": True, "message": f"{e}"[:500]})
    except BaseException as e:  # noqa: BLE001 - SystemExit from plug-in code included
        return RewardResult(0.0, {"error": f"{type(e).__name__}: {e}"[:500]})


# ----------------------------------------------------------------------------- parent side


@dataclass
class _Worker:
    process: Any  # multiprocessing.Process (spawn context)
    conn: Connection
    ready: bool = False
    started: float = field(default_factory=time.monotonic)
    job: int | None = None  # index into the batch being scored
    deadline: float = 0.0


def _kill(workers: list[_Worker]) -> None:
    """SIGKILL every worker and reap it; safe to call twice and at interpreter exit."""
    for w in workers:
        try:
            w.process.kill()
        except (OSError, ValueError, AttributeError):
            pass
    for w in workers:
        try:
            w.process.join(timeout=10.0)
            w.conn.close()
        except (OSError, ValueError, AssertionError, AttributeError):
            pass
    workers.clear()


class RewardRunner:
    """Scores ``(reward, sample)`` jobs in worker processes with per-sample deadlines."""

    def __init__(self, rewards: Sequence[Reward], workers: int,
                 startup_timeout_s: float = 120.0) -> None:
        if workers < 1:
            raise ValueError(f"rewards.workers must be >= 1, got {workers}")
        self.rewards = list(rewards)
        self.size = workers
        self.startup_timeout_s = startup_timeout_s
        self.restarts = 0  # workers killed because a sample ran past its deadline
        self.worker_deaths = 0
        self._lock = threading.Lock()  # one batch at a time
        self._workers: list[_Worker] = []
        self._next_index = 0
        # Kill the workers even if the owner never calls close().
        self._finalizer = weakref.finalize(self, _kill, self._workers)

    # ------------------------------------------------------------------ workers

    def _spawn(self) -> _Worker:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        process = ctx.Process(target=_worker_main, args=(child, self.rewards, self._next_index),
                              name=f"r1mega-reward-worker-{self._next_index}", daemon=True)
        self._next_index += 1
        process.start()
        child.close()
        return _Worker(process, parent)

    def _replace(self, worker: _Worker) -> None:
        _kill([worker])
        self._workers.remove(worker)
        self._workers.append(self._spawn())

    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (empty before the first batch)."""
        return sorted(w.process.pid for w in self._workers if w.process.pid is not None)

    def _startup_failed(self, worker: _Worker, why: str) -> None:
        _kill(self._workers)
        raise RuntimeError(f"could not start the reward scoring workers: {why}")

    # ------------------------------------------------------------------ scoring

    def run(self, jobs: Sequence[tuple[int, RewardInput]]) -> list[RewardResult]:
        """Results in job order (``jobs``: reward index, sample); every job gets one."""
        with self._lock:
            try:
                return self._run(jobs)
            except BaseException:
                # Interrupted mid-batch (Ctrl-C, a bug): samples may still be running.
                _kill(self._workers)
                raise

    def _run(self, jobs: Sequence[tuple[int, RewardInput]]) -> list[RewardResult]:
        results: list[RewardResult | None] = [None] * len(jobs)
        pending = deque(range(len(jobs)))
        while len(self._workers) < self.size:
            self._workers.append(self._spawn())

        while pending or any(w.job is not None for w in self._workers):
            for w in self._workers:  # hand out work to every ready, idle worker
                if w.ready and w.job is None and pending:
                    i = pending.popleft()
                    reward_index, sample = jobs[i]
                    try:
                        w.conn.send((reward_index, sample))
                    except (OSError, ValueError):  # died while idle: the sample never ran
                        pending.appendleft(i)
                        self.worker_deaths += 1
                        self._replace(w)
                        break
                    w.job = i
                    w.deadline = time.monotonic() + self.rewards[reward_index].budget_s(sample)
            now = time.monotonic()
            deadlines = [w.deadline if w.ready else w.started + self.startup_timeout_s
                         for w in self._workers if w.job is not None or not w.ready]
            if not deadlines:
                continue
            ready = wait([w.conn for w in self._workers] + [w.process.sentinel
                                                            for w in self._workers],
                         timeout=max(0.0, min(deadlines) - now))
            for w in list(self._workers):
                if w.conn in ready or w.process.sentinel in ready:
                    self._collect(w, jobs, results)
            now = time.monotonic()
            for w in list(self._workers):
                if w.job is not None and w.ready and w.deadline <= now:
                    reward = self.rewards[jobs[w.job][0]]
                    results[w.job] = RewardResult(0.0, {
                        "timeout": True,
                        "message": f"no result after {reward.budget_s(jobs[w.job][1]):g} s"})
                    self.restarts += 1
                    self._replace(w)
                elif not w.ready and now - w.started > self.startup_timeout_s:
                    self._startup_failed(w, f"not ready after {self.startup_timeout_s:.0f} s")
        return [r if r is not None else RewardResult(0.0, {"error": "unscored"})
                for r in results]

    def _collect(self, w: _Worker, jobs: Sequence[tuple[int, RewardInput]],
                 results: list[RewardResult | None]) -> None:
        """Read what ``w`` sent, or handle its death."""
        try:
            message = w.conn.recv() if w.conn.poll() else None
        except (EOFError, OSError):
            message = None
        if message is None:
            if w.process.is_alive():
                return  # a spurious wake-up
            if not w.ready:
                self._startup_failed(w, f"a worker exited with status {w.process.exitcode} "
                                     "while starting")
            if w.job is not None:
                results[w.job] = RewardResult(0.0, {"error": DIED})
            self.worker_deaths += 1
            self._replace(w)
            return
        kind, payload = message
        if kind == "ready":
            w.ready = True
        elif kind == "failed":
            self._startup_failed(w, payload)
        elif kind == "result" and w.job is not None:
            results[w.job] = payload
            w.job = None

    def close(self) -> None:
        """Kill the workers now (new ones start if :meth:`run` is called again)."""
        with self._lock:
            _kill(self._workers)
