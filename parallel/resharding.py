"""Weight resharding from the training layout to the generation layout.

Every RL step the policy's weights change, and the generation-layout copy of the model
must receive them. megatron-core 0.19's ``megatron.core.resharding`` does the heavy
lifting: each rank describes the tensors it owns (shape, TP split and stride, EP group,
global layer number), one all-gather gives every rank the whole picture, and each rank
derives its own sends and receives (local copies where it already holds the data, LCM
tiling across TP sizes, round-robin over DP replicas), which a copy service executes
(gloo on CPU, NCCL on GPU). The plan is built once and reused every step.

Where it falls short (megatron-core 0.19.2), this module fills the gap:

* **Per-expert modules.** The planner maps rank-local expert indices to global ones only
  for Transformer Engine's grouped experts (parameters named ``weight<k>``). The local
  (non-TE) MoE layer, used on CPU and by ``transformer_impl=local``, stores experts as
  ``experts.local_experts.<k>.*``; across an EP change those names would silently pair
  expert ``k`` of one EP rank with expert ``k`` of another. :func:`_resolve_local_expert`
  rewrites them to global indices before planning.
* **Tied embeddings.** With embeddings tied to the output layer and PP > 1, the last
  training stage holds a copy of the embedding as ``output_layer.weight``; the planner
  only looks for ``embedding.word_embeddings.weight`` and fetches it from the first
  stage even when the rank already holds the copy. :func:`_tied_embedding_alias`
  offers the copy under the embedding's name, so such ranks copy locally.
* **One model chunk.** Virtual pipeline stages (several chunks per rank) are refused
  with a clear error; megatron's refit reads only the first chunk.
* **Traffic accounting.** :class:`TrafficReport` counts what the plan moves per rank
  (remote bytes, local copies) and, independently, the minimum a rank must receive: the
  part of its generation shard that its own training shard does not hold, computed from
  the distributed-checkpoint view of both models (global offsets of every shard), not
  from the planner.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from parallel.platform import gpu_available

_LOCAL_EXPERT = re.compile(r"(?<=\.local_experts\.)(\d+)(?=\.)")


@dataclass(frozen=True)
class TrafficReport:
    """Bytes one reshard moves on this rank."""

    remote_recv_bytes: int  # received from other ranks
    local_copy_bytes: int  # copied from this rank's own training shard
    remote_send_bytes: int  # sent to other ranks
    minimum_recv_bytes: int  # generation shard bytes this rank's training shard lacks
    generation_bytes: int  # size of this rank's generation shard

    def as_metrics(self, prefix: str = "perf/reshard_") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in self.__dict__.items()}


def bare_model(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel under DDP / Float16 wrappers."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(module)


def _global_layer_prefixes(module: torch.nn.Module) -> dict[str, str]:
    """Map rank-local layer module paths to global ones (``decoder.layers.0`` on PP
    stage 1 of 2 with 4 layers -> ``decoder.layers.2``), from each layer's 1-based
    global ``layer_number``."""
    prefixes: dict[str, str] = {}
    for name, sub in module.named_modules():
        number = getattr(sub, "layer_number", None)
        parts = name.split(".")
        if name and isinstance(number, int) and parts[-1].isdigit():
            parts[-1] = str(number - 1)
            prefixes[name] = ".".join(parts)
    return prefixes


def _resolve_local_expert(meta: Any, num_experts: int | None) -> None:
    """Rewrite ``local_experts.<k>`` to the global expert index in ``resolved_name``."""
    match = _LOCAL_EXPERT.search(meta.resolved_name)
    if match is None or not meta.is_ep or not num_experts:
        return
    ep_ranks = meta.expert_parallel_group_ranks
    per_rank = num_experts // len(ep_ranks)
    global_index = ep_ranks.index(meta.owner_rank) * per_rank + int(match.group(1))
    meta.resolved_name = _LOCAL_EXPERT.sub(str(global_index), meta.resolved_name, count=1)
    meta.global_expert_index = global_index


def _tensor_metadata(module: torch.nn.Module | None, rank: int, num_experts: int | None
                     ) -> list[Any]:
    """megatron's per-tensor reshard metadata for ``module`` (parameters and persistent
    buffers), with global layer and expert names."""
    from megatron.core import parallel_state
    from megatron.core.resharding.utils import extract_param_metadata, named_refit_tensors

    if module is None:
        return []
    pg = module.pg_collection
    if getattr(pg, "dp", None) is None:
        pg.dp = parallel_state.get_data_parallel_group()
    prefixes = _global_layer_prefixes(module)
    rank_lists: dict[Any, Any] = {}
    metas = []
    for name, tensor in named_refit_tensors(module):
        meta = extract_param_metadata(tensor, name, rank, pg, num_experts=num_experts,
                                      layer_module_prefix_map=prefixes,
                                      _rank_list_cache=rank_lists)
        _resolve_local_expert(meta, num_experts)
        metas.append(meta)
    return metas + _tied_embedding_alias(module, metas)


def _tied_embedding_alias(module: torch.nn.Module, metas: list[Any]) -> list[Any]:
    """The last stage's copy of a tied embedding, offered as the embedding itself."""
    import copy

    if not getattr(module, "share_embeddings_and_output_weights", False) or module.pre_process:
        return []
    aliases = []
    for meta in metas:
        if meta.resolved_name == "output_layer.weight":
            alias = copy.copy(meta)
            alias.resolved_name = "embedding.word_embeddings.weight"
            aliases.append(alias)
    return aliases


def build_plan(src: torch.nn.Module | None, dst: torch.nn.Module | None,
               num_experts: int | None) -> Any:
    """This rank's reshard plan (collective over the job)."""
    from megatron.core.resharding import build_plan_from_rosters, index_metadata_rosters

    rank, world = dist.get_rank(), dist.get_world_size()
    mine = (_tensor_metadata(src, rank, num_experts), _tensor_metadata(dst, rank, num_experts))
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    dst_by_rank, src_by_name = index_metadata_rosters(gathered)
    _check_dtypes(dst_by_rank.get(rank, {}), src_by_name)
    return build_plan_from_rosters(dst_by_rank, src_by_name, rank)


def _check_dtypes(dst_meta: dict[str, Any], src_by_name: dict[str, list[Any]]) -> None:
    """The copy services move raw bytes: a dtype mismatch would corrupt the weights."""
    for name, meta in dst_meta.items():
        sources = src_by_name.get(name)
        if sources and sources[0].dtype != meta.dtype:
            raise TypeError(
                f"resharding {name}: training dtype {sources[0].dtype} but generation "
                f"dtype {meta.dtype}; build both models with the same precision.params_dtype"
            )


def copy_service(backend: str = "auto") -> Any:
    """A megatron copy service: NCCL on GPU, gloo on CPU (``auto``). Collective."""
    from megatron.core.resharding.copy_services.gloo_copy_service import GlooCopyService
    from megatron.core.resharding.copy_services.nccl_copy_service import NCCLCopyService

    if backend == "auto":
        backend = "nccl" if gpu_available() else "gloo"
    if backend == "nccl":
        return NCCLCopyService()
    if backend == "gloo":
        return GlooCopyService()
    raise ValueError(f"rollout.refit_backend={backend!r}: use auto, nccl or gloo")


class WeightResharder:
    """Copies the training-layout weights into a generation-layout model, every step.

    Construction is collective (metadata all-gather, copy-service groups); so is every
    :meth:`reshard`. The plan is computed once: parameter shapes and layouts never
    change during a run, only values.
    """

    def __init__(self, train_chunks: Sequence[torch.nn.Module], generation_model: torch.nn.Module,
                 backend: str = "auto") -> None:
        if len(train_chunks) != 1:
            raise NotImplementedError(
                f"resharding supports one model chunk per rank, got {len(train_chunks)} "
                "(virtual pipeline stages are not supported by megatron-core's refit)"
            )
        self.src = bare_model(train_chunks[0])
        self.dst = bare_model(generation_model)
        num_experts = self.src.config.num_moe_experts
        self.plan = build_plan(self.src, self.dst, num_experts)
        self.service = copy_service(backend)
        self.traffic = traffic_report(self.plan, self.src, self.dst)
        self.last_seconds = 0.0

    @torch.no_grad()
    def reshard(self) -> float:
        """Copy the current training weights into the generation model; returns seconds."""
        from megatron.core.resharding import execute_reshard_plan

        start = time.perf_counter()
        execute_reshard_plan(self.plan, self.src, self.dst, service=self.service)
        self.last_seconds = time.perf_counter() - start
        return self.last_seconds


# ----------------------------------------------------------------------------- traffic


def traffic_report(plan: Any, src: torch.nn.Module, dst: torch.nn.Module) -> TrafficReport:
    """Bytes the plan moves on this rank, and the minimum it must receive."""
    from megatron.core.resharding.utils import get_refit_tensor_dict

    rank = dist.get_rank()
    src_tensors, dst_tensors = get_refit_tensor_dict(src), get_refit_tensor_dict(dst)
    remote = local = sent = 0
    for op in plan.recv_ops:
        t = dst_tensors[op.param_name]
        nbytes = t[op.my_slice].numel() * t.element_size()
        if op.peer_rank == rank:
            local += nbytes
        else:
            remote += nbytes
    for op in plan.send_ops:
        if op.peer_rank != rank:
            t = src_tensors[op.param_name]
            sent += t[op.my_slice].numel() * t.element_size()
    generation = sum(t.numel() * t.element_size() for t in dst_tensors.values())
    return TrafficReport(remote_recv_bytes=remote, local_copy_bytes=local,
                         remote_send_bytes=sent,
                         minimum_recv_bytes=minimum_recv_bytes(src, dst),
                         generation_bytes=generation)


Box = tuple[tuple[int, ...], tuple[int, ...]]  # (global offset, shape)


def shard_boxes(module: torch.nn.Module) -> dict[str, list[tuple[Box, int]]]:
    """Every tensor shard this rank holds, as global boxes per checkpoint key, with the
    element size: megatron's distributed-checkpoint view (factories such as the GLU
    split applied), independent of the reshard planner."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sharded = module.sharded_state_dict()
    apply_factories(sharded)
    boxes: dict[str, list[tuple[Box, int]]] = {}
    for item in nested_values(sharded):
        if not isinstance(item, ShardedTensor) or item.data is None:
            continue
        shape = (1,) * item.prepend_axis_num + tuple(item.local_shape)
        boxes.setdefault(item.key, []).append(
            ((tuple(item.global_offset), shape), item.data.element_size()))
    return boxes


def _overlap(a: Box, b: Box) -> int:
    volume = 1
    for start_a, len_a, start_b, len_b in zip(a[0], a[1], b[0], b[1], strict=True):
        extent = min(start_a + len_a, start_b + len_b) - max(start_a, start_b)
        if extent <= 0:
            return 0
        volume *= extent
    return volume


def _volume(box: Box) -> int:
    volume = 1
    for n in box[1]:
        volume *= n
    return volume


def minimum_recv_bytes(src: torch.nn.Module, dst: torch.nn.Module) -> int:
    """Bytes of this rank's generation shard that are not in its training shard."""
    have = shard_boxes(src)
    missing = 0
    for key, shards in shard_boxes(dst).items():
        for box, element_size in shards:
            local = sum(_overlap(box, own) for own, _ in have.get(key, []))
            missing += (_volume(box) - local) * element_size
    return missing


def iter_generation_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors resharding writes (parameters and persistent buffers)."""
    from megatron.core.resharding.utils import named_refit_tensors

    yield from named_refit_tensors(bare_model(module))
