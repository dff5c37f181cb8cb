"""Memory handover between training and generation on the same devices.

Training holds weights, fp32 gradient buffers and optimizer state; generation needs the
generation-layout weights and a KV cache. Colocated on one GPU, the two must not be
resident together:

* before generation: the gradient buffers are freed (their storage released; every view
  into them stays valid), the optimizer state moves to host memory, and the
  generation-layout weights get their storage back;
* after generation: the generation weights are released (the rollout engine suspends
  its KV memory when it finishes), gradients are re-allocated (zeroed) and the optimizer
  state returns to the device.

megatron-core 0.19 provides the training half (``DistributedDataParallel.
offload_grad_buffers`` / ``restore_grad_buffers``, ``MegatronOptimizer.offload_to_cpu`` /
``restore_from_cpu``). On a CPU-only machine the host *is* the device: gradient buffers
are still released, the optimizer state has nowhere else to go and is reported as held.

:meth:`MemoryHandover.held_bytes` reports what each phase holds, for the step metrics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from parallel.platform import gpu_available
from parallel.resharding import iter_generation_tensors

GIB = 1024**3


def _storage_bytes(tensors: Any, seen: set[int]) -> int:
    """Bytes of the distinct storages behind ``tensors`` not already in ``seen``."""
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def _on_device(t: torch.Tensor) -> bool:
    return t.is_cuda or not gpu_available()


class MemoryHandover:
    """Moves training state out of the way of generation and back."""

    def __init__(self, policy: Any, optimizer: Any, generation_model: torch.nn.Module,
                 offload_training_state: bool = True,
                 release_generation_weights: bool = True,
                 kv_cache_bytes: Callable[[], int] = lambda: 0) -> None:
        self.policy = policy
        self.optimizer = optimizer
        self.generation_model = generation_model
        self.offload_training_state = offload_training_state
        self.release_generation_weights = release_generation_weights
        self._generation_sizes: dict[int, int] = {}
        self.kv_cache_bytes = kv_cache_bytes  # the engine's resident KV buffer
        if release_generation_weights:
            self._release_generation_weights()

    # ------------------------------------------------------------------ phases

    @contextlib.contextmanager
    def generation(self) -> Iterator[None]:
        """Within the block the devices hold the generation weights (and the engine's KV
        cache), not gradients or optimizer state."""
        self._to_generation()
        try:
            yield
        finally:
            self._to_training()

    def _to_generation(self) -> None:
        if self.offload_training_state:
            for chunk in self.policy.chunks:
                chunk.offload_grad_buffers(synchronize=gpu_available(),
                                           empty_cache=gpu_available())
            if gpu_available():
                self.optimizer.offload_to_cpu()
        if self.release_generation_weights:
            self._restore_generation_weights()

    def _to_training(self) -> None:
        if self.release_generation_weights:
            self._release_generation_weights()
        if self.offload_training_state:
            if gpu_available():
                self.optimizer.restore_from_cpu()
            for chunk in self.policy.chunks:
                chunk.restore_grad_buffers(synchronize=gpu_available())
        if gpu_available():
            torch.cuda.empty_cache()

    def _release_generation_weights(self) -> None:
        for _, t in iter_generation_tensors(self.generation_model):
            storage = t.untyped_storage()
            if storage.nbytes():
                self._generation_sizes[id(t)] = storage.nbytes()
                storage.resize_(0)

    def _restore_generation_weights(self) -> None:
        for _, t in iter_generation_tensors(self.generation_model):
            size = self._generation_sizes.get(id(t))
            if size and t.untyped_storage().nbytes() == 0:
                t.untyped_storage().resize_(size)

    # ------------------------------------------------------------------ accounting

    def held_bytes(self) -> dict[str, int]:
        """Bytes resident on the device now, by kind."""
        weights = [p for c in self.policy.unwrapped() for p in c.parameters()]
        grads = [b.grad_data for c in self.policy.chunks
                 for b in c.buffers + c.expert_parallel_buffers if b.grad_data is not None]
        state = [v for s in _optimizer_states(self.optimizer) for v in s.values()
                 if isinstance(v, torch.Tensor)]
        main_params = [p for g in _param_groups(self.optimizer) for p in g["params"]]
        generation = [t for _, t in iter_generation_tensors(self.generation_model)]
        seen: set[int] = set()  # a storage shared by two kinds counts once, for the first
        return {
            "train_weights": _storage_bytes((t for t in weights if _on_device(t)), seen),
            "grad_buffers": _storage_bytes((t for t in grads if _on_device(t)), seen),
            "optimizer_state": _storage_bytes(
                (t for t in state + main_params if _on_device(t)), seen),
            "generation_weights": _storage_bytes(
                (t for t in generation if _on_device(t)), seen),
            "kv_cache": self.kv_cache_bytes(),
        }

    def held_metrics(self, phase: str) -> dict[str, float]:
        held = self.held_bytes()
        metrics = {f"memory/{phase}/{k}_gib": v / GIB for k, v in held.items()}
        metrics[f"memory/{phase}/total_gib"] = sum(held.values()) / GIB
        if gpu_available():
            metrics[f"memory/{phase}/allocated_gib"] = torch.cuda.memory_allocated() / GIB
        return metrics


def _inner_optimizers(optimizer: Any) -> list[Any]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _optimizer_states(optimizer: Any) -> list[dict[str, Any]]:
    states = []
    for opt in _inner_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is not None:
            states.extend(inner.state.values())
    return states


def _param_groups(optimizer: Any) -> list[dict[str, Any]]:
    groups = []
    for opt in _inner_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is not None:
            groups.extend(inner.param_groups)
    return groups
