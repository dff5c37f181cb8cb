"""Token entropy of the policy's next-token distribution (single-device reference).

``H = logsumexp(z) - sum_v softmax(z)_v * z_v = -sum_v p_v log p_v`` computed from
``log_softmax`` so nothing overflows for large logits, and with ``0 * log 0 = 0`` so
``-inf`` logits (masked vocabulary entries) give neither ``nan`` values nor ``nan``
gradients. Used as a monitoring statistic (entropy collapse, DAPO sec. 3.1) and for an
optional entropy bonus. A vocab-parallel version (logits sharded over tensor-parallel
ranks) lives elsewhere; this is the reference it is tested against.
"""

from __future__ import annotations

import torch
from torch import Tensor


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy (nats) over the last dimension: ``[..., V] -> [...]``.

    Half-precision logits are computed in float32 and the result is float32; float32 and
    float64 keep their dtype.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    logp = torch.where(p > 0, logp, torch.zeros_like(logp))
    return -(p * logp).sum(dim=-1)


__all__ = ["entropy_from_logits"]
