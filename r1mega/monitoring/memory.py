"""Memory held per phase, for the step metrics (``memory/*``).

On GPU: the CUDA caching allocator's peak since the phase began (allocated bytes). On CPU:
the process's resident set size (there is no device allocator to ask).
"""

from __future__ import annotations

import psutil
import torch

GIB = 1024**3


def start_phase() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def phase_peak_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / GIB
    return psutil.Process().memory_info().rss / GIB
