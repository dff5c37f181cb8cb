"""The frozen reference policy, without a second model resident on the device.

GRPO's KL term needs log-probabilities under the initial (reference) policy. Keeping a
second copy of a 671B model on the GPUs is not affordable, so the reference is held as
this rank's shard of the weights in host memory, and swapped into the policy's own
parameter storage for a forward-only pass:

* device memory: nothing extra (the policy's parameters are overwritten in place and
  restored afterwards, so optimizer views into them stay valid);
* host memory: two copies of this rank's shard (the reference, and the policy's weights
  stashed during the reference pass), e.g. 2 x 2.6 GiB per GPU for DeepSeek-V3 671B in
  bf16 at 512 GPUs; pinned when a GPU is present so the copies run at PCIe speed.

Persistent buffers that change the function (MoE router expert biases) travel with the
weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from r1mega.training.policy import Policy


def _state_tensors(policy: Policy) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for i, module in enumerate(policy.unwrapped()):
        persistent = set(module.state_dict(keep_vars=True))
        for name, p in module.named_parameters():
            tensors[f"{i}.{name}"] = p.data
        for name, buf in module.named_buffers():
            if name in persistent:
                tensors[f"{i}.{name}"] = buf
    return tensors


def _host_copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    pin = torch.cuda.is_available()
    out = {}
    for name, t in tensors.items():
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
        host.copy_(t, non_blocking=pin)
        out[name] = host
    if pin:
        torch.cuda.synchronize()
    return out


class ReferencePolicy:
    """A host-memory snapshot of the policy's weights, used through :meth:`swapped_into`."""

    def __init__(self, policy: Policy) -> None:
        self._weights = _host_copy(_state_tensors(policy))

    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._weights.values())

    def refresh(self, policy: Policy) -> None:
        """Make the current policy the new reference (R1's periodic reference reset)."""
        self._weights = _host_copy(_state_tensors(policy))

    @contextlib.contextmanager
    def swapped_into(self, policy: Policy) -> Iterator[None]:
        """Within the block, the policy's parameters hold the reference weights."""
        live = _state_tensors(policy)
        if live.keys() != self._weights.keys():
            missing = sorted(set(live) ^ set(self._weights))[:5]
            raise RuntimeError(f"reference and policy parameters differ: {missing}")
        stash = _host_copy(live)
        try:
            with torch.no_grad():
                for name, t in live.items():
                    t.copy_(self._weights[name], non_blocking=True)
            yield
        finally:
            with torch.no_grad():
                for name, t in live.items():
                    t.copy_(stash[name], non_blocking=True)
