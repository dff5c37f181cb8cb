"""``accuracy``: is the final answer mathematically equal to the ground truth?

Extraction: the content of the last ``<answer>...</answer>`` block and, inside it, the last
balanced ``\\boxed{...}`` if there is one. A response without an answer block scores 0
(``info={"no_answer": True}``) and is never sent to the verifier.

Verification uses math-verify (``verify(parse(gold), parse(pred))``). Why a process pool:

* math-verify bounds its own work with ``signal.alarm``, which only works in the main
  thread of a process, so it cannot run in the trainer's helper threads;
* an alarm cannot interrupt C code (a huge sympy integer power, a pathological regex), so
  a check can hang for good. Only killing the process bounds it.

So checks run in a ``ProcessPoolExecutor`` (spawn context: forking a process that holds
CUDA contexts and NCCL threads is unsafe) with at most ``workers`` checks in flight. Each
check gets ``timeout_s`` of wall time from its submission; because no more checks than
workers are ever in flight and the workers are started and warmed up before any check is
submitted, submission time is start time. A check past its deadline scores 0 with
``{"timeout": True}``; the pool is then recycled (its processes killed, a new pool
started) since a ``ProcessPoolExecutor`` cannot kill one worker. Checks that were in flight
on the other workers are resubmitted, not penalised. A check that raises scores 0 with
``{"error": ...}``. A worker that dies outright (segfault, ``os._exit``) breaks the pool;
the checks in flight are then re-run one at a time to find the culprit, which scores 0
with an error, so one bad sample never zeroes its neighbours.

``params.verify_fn`` (``"module:function"``, called as ``fn(gold, pred) -> bool | float``)
replaces the math-verify check. It exists for tests (inject a hang or a crash) and for
domain-specific checkers; it must be importable in a fresh interpreter. Raising
``TimeoutError`` from it counts as a timeout.

:meth:`AccuracyReward.stats` exposes cumulative counters (checks, timeouts, errors,
no_answer, no_ground_truth, worker_deaths, pool_restarts) for the trainer to log.
"""

from __future__ import annotations

import importlib
import math
import multiprocessing
import os
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from r1mega.rewards.base import Reward, RewardInput, RewardResult
from r1mega.rewards.extract import last_answer_block, last_boxed
from r1mega.rewards.registry import register_reward
from r1mega.utils.process import die_with_parent

__all__ = [
    "AccuracyReward",
    "VerifierPool",
    "extract_final_answer",
    "math_verify_check",
    "resolve_callable",
]

VerifyFn = Callable[[str, str], Any]
Outcome = tuple[str, float, str]  # (status: ok | timeout | error, score, message)

# ----------------------------------------------------------------------------- worker side

_VERIFY_FN: VerifyFn | None = None
_MATH_VERIFY_TIMEOUT_S = 5  # math-verify's own alarm (integer seconds), set per worker


def _as_math(text: str) -> str:
    """Wrap bare LaTeX in ``$...$`` so math-verify's LaTeX extractor sees it.

    Without delimiters math-verify only tries its plain-expression extractor, which reads
    ``(1, 2)`` as ``2`` and ``\\sqrt{2}`` as nothing. Text that already has math delimiters
    (or a ``\\boxed``) is passed through so its own structure is used.
    """
    text = text.strip()
    if any(tok in text for tok in ("$", "\\(", "\\[", "\\boxed", "\\fbox")):
        return text
    return f"${text}$"


def math_verify_check(gold: str, pred: str) -> bool:
    """math-verify equivalence of two answer strings (gold first: the check is asymmetric).

    Parsing timeouts raise ``TimeoutError`` so they are counted as timeouts; unparseable
    input is simply not equal.
    """
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    def _parse(text: str) -> list[Any]:
        try:
            return parse(
                _as_math(text), parsing_timeout=_MATH_VERIFY_TIMEOUT_S, raise_on_error=True
            )
        except TimeoutException as e:
            raise TimeoutError(f"math-verify parsing timed out: {e}") from None
        except Exception:
            return []

    gold_parsed = _parse(gold)
    if not gold_parsed:
        raise ValueError(f"could not parse the ground truth {gold[:200]!r}")
    pred_parsed = _parse(pred)
    if not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=_MATH_VERIFY_TIMEOUT_S))


def resolve_callable(path: str) -> VerifyFn:
    """Import ``"package.module:function"``."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected 'module:function', got {path!r}")
    module = importlib.import_module(module_name)
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"{path!r} is not callable")
    return fn  # type: ignore[return-value]


def _init_worker(
    verify_fn: str | None,
    math_verify_timeout_s: int,
    barrier: Any,
    startup_timeout_s: float,
) -> None:
    """Pool initializer: import and warm everything, then wait for the other workers.

    The barrier makes pool start-up all-or-nothing: once any warm-up task returns, every
    worker is ready, so no check's deadline is spent importing sympy.
    """
    global _VERIFY_FN, _MATH_VERIFY_TIMEOUT_S
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _MATH_VERIFY_TIMEOUT_S = math_verify_timeout_s
    math_verify_check("1", "1")  # imports sympy and loads the LaTeX grammar
    _VERIFY_FN = resolve_callable(verify_fn) if verify_fn else math_verify_check
    barrier.wait(timeout=startup_timeout_s)


def _ping() -> int:
    return os.getpid()


def _check(gold: str, pred: str) -> Outcome:
    """One verification in a worker; never raises, so only a dead worker breaks the pool."""
    from math_verify.errors import TimeoutException

    assert _VERIFY_FN is not None, "worker not initialised"
    try:
        value = _VERIFY_FN(gold, pred)
        return ("ok", float(value), "")
    except (TimeoutError, TimeoutException) as e:
        return ("timeout", 0.0, f"{type(e).__name__}: {e}")
    except BaseException as e:  # noqa: BLE001 - SystemExit from user code included
        return ("error", 0.0, f"{type(e).__name__}: {e}"[:500])


# ----------------------------------------------------------------------------- parent side


def _kill_executor(executor: ProcessPoolExecutor | None) -> None:
    """Kill a pool's workers and abandon it without waiting on anything they hold.

    ``ProcessPoolExecutor`` has no public way to kill workers; ``_processes`` (pid ->
    Process) has been stable across CPython 3.8-3.13.
    """
    if executor is None:
        return
    procs = list((getattr(executor, "_processes", None) or {}).values())
    for proc in procs:
        try:
            proc.kill()
        except (OSError, ValueError):
            pass
    executor.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        try:
            proc.join(timeout=5.0)
        except (OSError, ValueError, AssertionError):
            pass


class VerifierPool:
    """Runs ``(gold, pred)`` checks in worker processes with a hard per-check deadline."""

    def __init__(
        self,
        workers: int,
        timeout_s: float,
        verify_fn: str | None = None,
        *,
        startup_timeout_s: float = 120.0,
    ) -> None:
        self.workers = workers
        self.timeout_s = timeout_s
        self.verify_fn = verify_fn
        self.startup_timeout_s = startup_timeout_s
        self.restarts = 0  # pools killed because of a hang or a dead worker
        self.worker_deaths = 0
        self._lock = threading.Lock()  # one batch at a time: deadlines assume idle workers
        self._holder: list[ProcessPoolExecutor | None] = [None]
        # Kill the workers even if the owner forgets close(): a live pool would otherwise
        # keep the interpreter from exiting.
        self._finalizer = weakref.finalize(self, VerifierPool._finalize, self._holder)

    @staticmethod
    def _finalize(holder: list[ProcessPoolExecutor | None]) -> None:
        _kill_executor(holder[0])
        holder[0] = None

    def _start(self) -> ProcessPoolExecutor:
        ctx = multiprocessing.get_context("spawn")
        barrier = ctx.Barrier(self.workers)
        mv_timeout = max(1, math.ceil(self.timeout_s))
        executor = ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(self.verify_fn, mv_timeout, barrier, self.startup_timeout_s),
        )
        # With the spawn context, each submit that finds no idle worker starts one, so
        # ``workers`` pings start every worker; the barrier holds them until all are warm.
        pings = [executor.submit(_ping) for _ in range(self.workers)]
        done, not_done = wait(pings, timeout=self.startup_timeout_s + 5.0)
        failure = next((f.exception() for f in done if f.exception() is not None), None)
        if not_done or failure is not None:
            _kill_executor(executor)
            why = failure or f"not ready after {self.startup_timeout_s:.0f} s"
            raise RuntimeError(f"could not start the accuracy verifier workers: {why!r}")
        return executor

    def _executor(self) -> ProcessPoolExecutor:
        if self._holder[0] is None:
            self._holder[0] = self._start()
        return self._holder[0]

    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (empty before the first batch)."""
        executor = self._holder[0]
        return sorted((getattr(executor, "_processes", None) or {}).keys()) if executor else []

    def _recycle(self) -> None:
        _kill_executor(self._holder[0])
        self._holder[0] = None
        self.restarts += 1

    def run(self, jobs: Sequence[tuple[str, str]]) -> list[Outcome]:
        """Outcomes in job order; returns only when every job has one."""
        with self._lock:
            try:
                return self._run(jobs)
            except BaseException:
                # Interrupted mid-batch (Ctrl-C, a bug): checks may still be running, and
                # a hung one would block interpreter exit, which joins pool workers.
                _kill_executor(self._holder[0])
                self._holder[0] = None
                raise

    def _run(self, jobs: Sequence[tuple[str, str]]) -> list[Outcome]:
        results: list[Outcome | None] = [None] * len(jobs)
        pending: deque[int] = deque(range(len(jobs)))
        isolate: set[int] = set()  # suspects of a worker death: run alone to find it
        inflight: dict[Future[Outcome], tuple[int, float]] = {}

        def requeue(indices: list[int]) -> None:
            for i in sorted(indices, reverse=True):
                pending.appendleft(i)

        def pool_broke(casualties: list[int]) -> None:
            self.worker_deaths += 1
            self._recycle()
            if len(casualties) == 1:  # alone in flight (suspects always are): the culprit
                results[casualties[0]] = ("error", 0.0, "verifier worker process died")
            else:
                isolate.update(casualties)
                requeue(casualties)

        while pending or inflight:
            executor = self._executor()
            # Submit while there are idle workers; a suspect only runs alone.
            broken_at_submit: int | None = None
            while pending and len(inflight) < self.workers:
                if any(i in isolate for i, _ in inflight.values()):
                    break
                i = pending[0]
                if i in isolate and inflight:
                    break
                pending.popleft()
                try:
                    fut = executor.submit(_check, *jobs[i])
                except BrokenProcessPool:
                    broken_at_submit = i
                    break
                inflight[fut] = (i, time.monotonic() + self.timeout_s)
            if broken_at_submit is not None:
                casualties = [i for i, _ in inflight.values()]
                inflight.clear()
                pending.appendleft(broken_at_submit)  # never ran: not a suspect
                if casualties:
                    pool_broke(casualties)
                else:
                    self._recycle()
                continue

            next_deadline = min(d for _, d in inflight.values())
            done, _ = wait(
                list(inflight),
                timeout=max(0.0, next_deadline - time.monotonic()),
                return_when=FIRST_COMPLETED,
            )
            broken: list[int] = []
            for fut in done:
                i, _ = inflight.pop(fut)
                try:
                    results[i] = fut.result()
                except BrokenProcessPool:
                    broken.append(i)
                except Exception as e:  # e.g. an unpicklable result
                    results[i] = ("error", 0.0, f"{type(e).__name__}: {e}"[:500])
            if broken:
                # Every check still in flight died with the pool too.
                casualties = broken + [i for i, _ in inflight.values()]
                inflight.clear()
                pool_broke(casualties)
                continue

            now = time.monotonic()
            expired = [f for f, (_, d) in inflight.items() if d <= now]
            if expired:
                for fut in expired:
                    i, _ = inflight.pop(fut)
                    results[i] = ("timeout", 0.0, f"no result after {self.timeout_s:g} s")
                # The hung worker can only be stopped by killing the pool; the checks on
                # the other workers are innocent and run again with fresh deadlines.
                requeue([i for i, _ in inflight.values()])
                inflight.clear()
                self._recycle()

        return [r if r is not None else ("error", 0.0, "no result") for r in results]

    def close(self) -> None:
        """Kill the workers now (a new pool is started if :meth:`run` is called again)."""
        with self._lock:
            _kill_executor(self._holder[0])
            self._holder[0] = None


def extract_final_answer(response: str) -> str | None:
    """The last answer block's ``\\boxed{}`` content, else the whole block; None if no block."""
    block = last_answer_block(response)
    if block is None:
        return None
    boxed = last_boxed(block)
    answer = boxed if boxed is not None else block
    return answer.strip()


@register_reward("accuracy")
class AccuracyReward(Reward):
    """1.0 if the extracted final answer is math-verify-equal to ``sample.answer``, else 0.0."""

    @dataclass
    class Params:
        verify_fn: str | None = None  # "module:function" replacing math-verify (tests)
        timeout_s: float | None = None  # per check; None = rewards.timeout_s
        workers: int | None = None  # None = rewards.workers

    def __init__(self, params: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        p = self.params
        timeout_s = self.timeout_s if p.timeout_s is None else p.timeout_s
        workers = self.workers if p.workers is None else p.workers
        if not timeout_s > 0:
            raise self.param_error("timeout_s", f"must be > 0, got {timeout_s}")
        if workers < 1:
            raise self.param_error("workers", f"must be >= 1, got {workers}")
        if p.verify_fn is not None:
            try:
                resolve_callable(p.verify_fn)  # fail at start-up, not in a worker
            except (ImportError, AttributeError, ValueError) as e:
                raise self.param_error("verify_fn", f"cannot import {p.verify_fn!r}: {e}") from e
        self.pool = VerifierPool(workers, timeout_s, p.verify_fn)
        self._counts = {
            "checks": 0,
            "timeouts": 0,
            "errors": 0,
            "no_answer": 0,
            "no_ground_truth": 0,
        }

    def __call__(self, samples: Sequence[RewardInput]) -> list[RewardResult]:
        results: list[RewardResult | None] = [None] * len(samples)
        jobs: list[tuple[str, str]] = []
        where: list[int] = []
        for i, sample in enumerate(samples):
            pred = extract_final_answer(sample.response)
            if sample.answer is None or not str(sample.answer).strip():
                results[i] = RewardResult(0.0, {"error": "sample has no ground-truth answer"})
                self._counts["no_ground_truth"] += 1
            elif pred is None or not pred:
                results[i] = RewardResult(0.0, {"no_answer": True})
                self._counts["no_answer"] += 1
            else:
                jobs.append((str(sample.answer), pred))
                where.append(i)
        if jobs:
            for i, (status, score, message) in zip(where, self.pool.run(jobs), strict=True):
                self._counts["checks"] += 1
                if status == "ok":
                    results[i] = RewardResult(score, {})
                elif status == "timeout":
                    self._counts["timeouts"] += 1
                    results[i] = RewardResult(0.0, {"timeout": True, "message": message})
                else:
                    self._counts["errors"] += 1
                    results[i] = RewardResult(0.0, {"error": message})
        return [r if r is not None else RewardResult(0.0, {"error": "unscored"}) for r in results]

    def stats(self) -> dict[str, int]:
        return {
            **self._counts,
            "worker_deaths": self.pool.worker_deaths,
            "pool_restarts": self.pool.restarts,
        }

    def close(self) -> None:
        self.pool.close()
