"""The global distributed-checkpoint layout of a model, learnt from megatron itself.

Global dist-checkpoint keys and shapes do not depend on the parallel layout, so the
converter asks megatron-core what a world-size-1 model would save: it builds the model
from the ModelConfig on the ``meta`` device (no memory for weights: the full 671B
DeepSeek-V3 builds in ~20 s and ~1 GB of host memory) and reads its
``sharded_state_dict()``. That yields, for every module tensor (the names the mappings
use), the global key(s), global shape, and the chunk each piece occupies, including
megatron's stacking of homogeneous layers / experts along prepended axes and the
SwiGLU factory that stores ``linear_fc1`` as separately-shardable gate and up halves.

The model is built with megatron's local (non-Transformer-Engine) layer specs, as the CPU
platform trains it; the keys it saves are the ones TE's specs save (GPU clusters), so a
converted checkpoint loads into either. megatron-core maps dense layers' norms onto TE's
fused ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight`` itself; for MLA
layers ``r1mega.models.specs`` adds the same for the q/kv low-rank norms (TE fuses them
into ``linear_q_up_proj`` / ``linear_kv_up_proj``) and the dense layers' pre-MLP norm.
TE's grouped-GEMM experts save under ``SequentialMLP``'s keys (megatron-core's design).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from r1mega.convert.errors import ConversionError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FACTORIES = frozenset({
    "empty", "zeros", "ones", "full", "rand", "randn", "randint", "arange", "tensor",
    "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like",
    "empty_strided", "linspace", "normal", "eye", "as_tensor",
})


class _MetaFactories(TorchFunctionMode):
    """Every torch tensor factory allocates on ``meta``, whatever device it names.

    ``torch.device("meta")`` as a context does not work here: it recognises factories by
    identity, and the CPU platform layer (:mod:`parallel.platform`) has replaced them
    with wrappers; megatron also passes explicit devices (``current_device()``).
    """

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        kwargs = dict(kwargs or {})
        if getattr(func, "__name__", None) in _FACTORIES and getattr(func, "__module__", "") in (
                "torch", "torch._C._VariableFunctions"):
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a module tensor: a box of a global dist-checkpoint tensor."""

    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]  # in the global tensor, prepended axes included
    sizes: tuple[int, ...]  # prepended axes have size 1
    local: tuple[slice, ...]  # the box within the module tensor


@dataclass(frozen=True)
class ModuleTensor:
    """A tensor of the world-size-1 model and where its pieces are stored."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: tuple[Chunk, ...]


@dataclass
class MegatronLayout:
    """Module tensors and extra-state objects of a model's distributed checkpoint."""

    tensors: dict[str, ModuleTensor]
    objects: dict[str, Any]  # ShardedObject unique key -> data (None for extra states)

    def global_keys(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Global key -> (global shape, dtype) of every sharded tensor."""
        out = {}
        for t in self.tensors.values():
            for c in t.chunks:
                out[c.key] = (c.global_shape, t.dtype)
        return out


def _prime_device_context() -> None:
    """Let ``with torch.device(...)`` keep working in this process after the platform
    layer wraps torch's factories.

    torch's device context recognises factories through a set it builds (and caches) on
    first use; built after :func:`parallel.platform.apply_cpu_platform` it holds the
    wrappers, while the calls it intercepts are the original builtins the wrappers
    forward to, so tensors silently land on the CPU instead of the requested device.
    transformers' ``from_pretrained`` builds models under such a context: run after an
    in-process conversion it produced logits off by ~6e-3. Building the set first (from
    the original factories) avoids that; the platform layer should do it itself.
    """
    import torch.utils._device as device_context

    constructors = getattr(device_context, "_device_constructors", None)
    if constructors is not None:
        constructors()


@contextlib.contextmanager
def single_process_groups() -> Iterator[None]:
    """megatron's process groups at world size 1 (a private gloo group if none exists).

    Uses an in-memory store, so no port is opened; tears down only what it created.
    """
    from megatron.core import parallel_state

    from parallel.layout import Layout, destroy_layout, initialize_layout
    from parallel.platform import apply_cpu_platform

    _prime_device_context()
    apply_cpu_platform()
    created_pg = not dist.is_initialized()
    if created_pg:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise ConversionError("checkpoint conversion runs in a single process; this one is "
                              f"part of a job of {dist.get_world_size()}")
    created_groups = not parallel_state.model_parallel_is_initialized()
    if created_groups:
        initialize_layout(Layout(world_size=1))
    try:
        yield
    finally:
        if created_groups:
            destroy_layout()
        if created_pg:
            dist.destroy_process_group()


def build_meta_model(model_cfg: Any, dtype: str, transformer_impl: str = "local"
                     ) -> torch.nn.Module:
    """The world-size-1 GPTModel of ``model_cfg`` with ``dtype`` parameters, on ``meta``.

    Built with ``transformer_impl`` (local by default: it builds on any machine, and its
    checkpoint keys are TE's, see the module docstring); ``model_cfg`` is not changed.
    Call inside :func:`single_process_groups`.
    """
    import copy

    from parallel.layout import Layout
    from r1mega.config.schema import PrecisionConfig
    from r1mega.models import build_model

    if dtype not in _DTYPES:
        raise ConversionError(f"dtype {dtype!r}: use one of {sorted(_DTYPES)}")
    model_cfg = copy.deepcopy(model_cfg)
    model_cfg.transformer_impl = transformer_impl
    with _MetaFactories():
        return build_model(model_cfg, Layout(world_size=1), PrecisionConfig(params_dtype=dtype))


def _is_main_replica(replica_id: Any) -> bool:
    ids = replica_id if isinstance(replica_id, tuple) else (replica_id,)
    return all(i == 0 for i in ids)


def layout_of(model: torch.nn.Module) -> MegatronLayout:
    """Read a world-size-1 model's sharded state dict into a :class:`MegatronLayout`."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import (
        ShardedObject,
        ShardedTensor,
        ShardedTensorFactory,
    )

    tensors: dict[str, ModuleTensor] = {}
    objects: dict[str, Any] = {}
    for name, entry in model.sharded_state_dict().items():
        if isinstance(entry, ShardedObject):
            objects[entry.unique_key] = entry.data
            continue
        if isinstance(entry, ShardedTensorFactory):
            module_tensor = entry.data
            pieces = list(nested_values(entry.build()))
        elif isinstance(entry, ShardedTensor):
            module_tensor = entry.data
            pieces = [entry]
        else:
            raise TypeError(f"unexpected sharded state dict entry {name}: {type(entry)}")
        chunks = []
        for sh in pieces:
            if sh.flattened_range is not None or not _is_main_replica(sh.replica_id):
                raise TypeError(f"{sh.key}: unexpected sharding at world size 1")
            p = sh.prepend_axis_num
            local = tuple(slice(o, o + s) for o, s in
                          zip(sh.global_offset[p:], sh.local_shape, strict=True))
            chunks.append(Chunk(sh.key, tuple(sh.global_shape), tuple(sh.global_offset),
                                (1,) * p + tuple(sh.local_shape), local))
        covered = sum(torch.Size(c.sizes).numel() for c in chunks)
        if covered != module_tensor.numel():
            raise TypeError(f"{name}: stored pieces cover {covered} of "
                            f"{module_tensor.numel()} elements")
        tensors[name] = ModuleTensor(name, tuple(module_tensor.shape), module_tensor.dtype,
                                     tuple(chunks))
    return MegatronLayout(tensors, objects)


def model_layout(model_cfg: Any, dtype: str) -> MegatronLayout:
    """The distributed-checkpoint layout of ``model_cfg`` with ``dtype`` parameters."""
    with single_process_groups():
        return layout_of(build_meta_model(model_cfg, dtype))
