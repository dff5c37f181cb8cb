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

The reference is part of a training checkpoint (:meth:`ReferencePolicy.sharded_state_dict`
under the ``reference.`` prefix of the same distributed checkpoint): after
``grpo.reference_reset_interval`` resets it is no longer the initial weights, and even
before, a resumed run must not re-derive it from ``checkpoint.load`` (a run directory's
newest step changes as that run goes on).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from r1mega.training.policy import Policy

#: Key prefix of the reference's tensors inside a training checkpoint.
REFERENCE_PREFIX = "reference."


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

    def sharded_state_dict(self, policy: Policy) -> dict[str, Any]:
        """The reference as a megatron sharded state dict of the policy's structure, keys
        prefixed with ``reference.`` and data held in host copies (for saving it inside
        a training checkpoint; loading passes the same structure as the request)."""
        from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
        from megatron.core.dist_checkpointing.utils import add_prefix_for_sharding

        from r1mega.checkpointing.model_io import model_sharded_state_dict

        def host_copy(item: Any) -> Any:
            if isinstance(item, (ShardedTensor, ShardedTensorFactory)):
                item.data = item.data.detach().to("cpu", copy=True)
            return item

        with self.swapped_into(policy):
            state = model_sharded_state_dict(policy.chunks)
            dict_list_map_inplace(host_copy, state)
        add_prefix_for_sharding(state, REFERENCE_PREFIX)
        return state

    def load_state_dict(self, policy: Policy, state: dict[str, Any]) -> None:
        """Make ``state`` (the loaded counterpart of :meth:`sharded_state_dict`) the
        reference. The policy's modules map it onto its tensors; its own weights are
        restored afterwards."""
        live = _state_tensors(policy)
        stash = _host_copy(live)
        chunks = policy.unwrapped()
        try:
            with torch.no_grad():
                if len(chunks) == 1:
                    chunks[0].load_state_dict(state)
                else:
                    for i, chunk in enumerate(chunks):
                        chunk.load_state_dict(state[f"model{i}"])
            self._weights = _host_copy(_state_tensors(policy))
        finally:
            with torch.no_grad():
                for name, t in live.items():
                    t.copy_(stash[name], non_blocking=True)

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
