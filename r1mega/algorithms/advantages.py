"""Group-relative advantages: GRPO and Dr. GRPO, and the uniform-group filter of DAPO.

Rollouts are laid out group by group: samples ``i*G .. (i+1)*G - 1`` answer prompt ``i``
(``G = grpo.group_size``). Every token of a sample gets that sample's advantage.

* GRPO (Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in
  Open Language Models", sec. 4.1.2, outcome supervision):
  ``A_i = (r_i - mean(r_group)) / (std(r_group) + eps)``. The std is the *unbiased*
  sample std (``torch.std`` default, Bessel's correction ``1/(G-1)``), which is what
  TRL's ``GRPOTrainer`` and verl's ``compute_grpo_outcome_advantage`` use. Note ``eps``
  is added to the std (not under a square root), as in those implementations.
* Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical
  Perspective"): ``A_i = r_i - mean(r_group)``, no std division, which removes the
  question-difficulty bias of std normalisation.
* Uniform groups: when every sample of a group has the same reward, all its advantages
  are zero and the group carries no gradient signal. They are returned as exactly 0
  (not ``0 / eps`` round-off) and flagged by :func:`uniform_groups`; DAPO's dynamic
  sampling (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at
  Scale", sec. 3.2) drops them, for which :func:`keep_mask` gives the per-sample mask.

A group of size 1 has no spread: its advantage is 0 (the unbiased std would be ``nan``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

AdvantageKind = Literal["grpo", "dr_grpo"]
ADVANTAGES: tuple[str, ...] = ("grpo", "dr_grpo")


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """``rewards [B]`` as ``[B // G, G]`` (floating point), after checking the layout."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [batch], got shape {tuple(rewards.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of "
                         f"group_size={group_size}")
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    return rewards.view(-1, group_size)


def uniform_groups(rewards: Tensor, group_size: int) -> Tensor:
    """Bool ``[B // G]``: True for groups whose rewards are all equal (zero advantage)."""
    groups = _grouped(rewards, group_size)
    return (groups == groups[:, :1]).all(dim=1)


def keep_mask(rewards: Tensor, group_size: int) -> Tensor:
    """Bool ``[B]``: True for samples of non-uniform groups (DAPO dynamic sampling keeps
    these; multiply it into the response mask or index the batch with it)."""
    return (~uniform_groups(rewards, group_size)).repeat_interleave(group_size)


def group_advantages(rewards: Tensor, group_size: int, normalize_std: bool = True,
                     eps: float = 1e-6) -> Tensor:
    """Per-sample advantages ``[B]`` from per-sample rewards ``[B]`` (see module docstring).

    Args:
        rewards: scalar reward of each sample, grouped contiguously by prompt.
        group_size: samples per prompt ``G``.
        normalize_std: divide by the group's unbiased std plus ``eps`` (GRPO); False
            gives Dr. GRPO's mean-centred rewards.
        eps: added to the std to avoid dividing by ~0.
    """
    groups = _grouped(rewards, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if normalize_std and group_size > 1:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    uniform = (groups == groups[:, :1]).all(dim=1, keepdim=True)
    return torch.where(uniform, torch.zeros_like(centred), centred).reshape(-1)


def compute_advantages(rewards: Tensor, cfg: Any, eps: float = 1e-6) -> Tensor:
    """Dispatch on ``cfg.advantage`` (a :class:`~r1mega.config.schema.GRPOConfig`).

    ``"grpo"`` honours ``cfg.normalize_std``; ``"dr_grpo"`` never divides by the std,
    whatever ``normalize_std`` says (that is the point of Dr. GRPO).
    """
    kind = cfg.advantage
    if kind == "grpo":
        return group_advantages(rewards, cfg.group_size, bool(cfg.normalize_std), eps)
    if kind == "dr_grpo":
        return group_advantages(rewards, cfg.group_size, normalize_std=False, eps=eps)
    raise ValueError(f"unknown grpo.advantage {kind!r}; expected one of {ADVANTAGES}")


__all__ = ["ADVANTAGES", "AdvantageKind", "compute_advantages", "group_advantages",
           "keep_mask", "uniform_groups"]
