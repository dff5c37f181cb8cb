"""The response-length schedule: each step's rollout budget and training sequence length.

DeepSeek-R1-Zero let responses grow to 32,768 tokens and raised the limit to 65,536 from
step ~8.2k on. ``rollout.length_schedule`` lists such phases (``from_step``,
``max_new_tokens``); before the first phase, ``rollout.max_new_tokens`` applies. The
prompt budget ``train.seq_length - rollout.max_new_tokens`` is kept in every phase, so
the training sequence length grows with the response budget.

What each consumer does with a step's :class:`ResponseBudget`:

* the trainer passes ``max_new_tokens`` to the sampler in that step's
  :class:`~r1mega.rollout.types.SamplingParams` (the ``Sampler`` protocol's only budget
  input): samplers size per-call state (the rollout engine's KV cache) from the requests
  of each ``generate`` call, and samplers that must reserve memory once size it for
  :func:`largest_response_budget`;
* rollouts are laid out as ``[B, seq_length + 1]`` token batches, and Dr. GRPO's constant
  divisor is the step's ``max_new_tokens``;
* ``r1mega plan`` plans memory and time at :func:`largest_response_budget`, and
  validation checks every phase (``r1mega.config.validate``).

Torch-free: the planner and config validation import it on login nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ResponseBudget:
    """A step's response budget and the training sequence length that holds it."""

    max_new_tokens: int
    seq_length: int


def _phase_budget(cfg: Any, max_new_tokens: int) -> ResponseBudget:
    prompt_budget = cfg.train.seq_length - cfg.rollout.max_new_tokens
    return ResponseBudget(max_new_tokens=int(max_new_tokens),
                          seq_length=int(prompt_budget + max_new_tokens))


def phase_budgets(cfg: Any) -> list[tuple[int, ResponseBudget]]:
    """``(first step, budget)`` of every phase, the initial one (step 1) first."""
    phases = [(1, _phase_budget(cfg, cfg.rollout.max_new_tokens))]
    for phase in cfg.rollout.length_schedule:
        phases.append((int(phase.from_step), _phase_budget(cfg, phase.max_new_tokens)))
    return phases


def response_budget(cfg: Any, step: int) -> ResponseBudget:
    """The budget of ``step`` (1-based): the last phase that has started by then."""
    current = None
    for first_step, budget in phase_budgets(cfg):
        if first_step <= step:
            current = budget
    assert current is not None  # the initial phase starts at step 1
    return current


def largest_response_budget(cfg: Any) -> ResponseBudget:
    """The largest budget of the run (what memory must be planned and reserved for)."""
    return max((b for _, b in phase_budgets(cfg)), key=lambda b: b.seq_length)


def at_largest_response_budget(cfg: Any) -> Any:
    """A copy of ``cfg`` whose ``rollout.max_new_tokens`` / ``train.seq_length`` are the
    largest phase's (for the planner)."""
    from omegaconf import OmegaConf

    largest = largest_response_budget(cfg)
    return OmegaConf.merge(cfg, {"rollout": {"max_new_tokens": largest.max_new_tokens},
                                 "train": {"seq_length": largest.seq_length}})


__all__ = ["ResponseBudget", "at_largest_response_budget", "largest_response_budget",
           "phase_budgets", "response_budget"]
