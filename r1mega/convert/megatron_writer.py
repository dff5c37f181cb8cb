"""Stream a megatron-core distributed checkpoint (torch_dist format) to disk.

``dist_checkpointing.save`` needs every tensor in memory at once (its writer copies the
whole state dict before writing) and cannot append, so the converter talks to
``torch.distributed.checkpoint`` directly with a planner whose write items are the
chunks of a :class:`~r1mega.convert.megatron_layout.MegatronLayout` and whose
``resolve_data`` produces each chunk on demand. torch's own ``FileSystemWriter`` (2.14)
resolves items one at a time but keeps a reference to every tensor it wrote until the
file is closed (a dict it only needs for its safetensors format), which for one file
per rank is the whole model; :class:`_StreamingWriter` writes the same records with
torch's record writer and drops each tensor once written, so at most one group of
source tensors is alive. The files are what megatron itself would write at world size 1:
the same keys, global shapes, chunking, extra-state objects, the ``common_state`` object
and ``metadata.json``; ``dist_checkpointing.load`` then reads them at any TP/PP/EP
layout.
"""

from __future__ import annotations

import io
import os
import queue
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import _write_item
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from r1mega.convert.megatron_layout import Chunk, MegatronLayout

TensorSource = Callable[[str], torch.Tensor]


class _LazySavePlanner(DefaultSavePlanner):
    """A save planner with a fixed list of items, resolved lazily."""

    def __init__(self, items: list[WriteItem],
                 resolve: Callable[[WriteItem], torch.Tensor | io.BytesIO]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._items = items
        self._resolve = resolve

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(items=list(self._items))
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        return self._resolve(write_item)


class _StreamingWriter(FileSystemWriter):
    """torch's FileSystemWriter (one file, torch.save records written by torch's own
    ``_write_item``, torch 2.14) without retaining the written tensors."""

    def _write_data(self, planner: SavePlanner, file_queue: queue.Queue
                    ) -> Future[list[WriteResult]]:
        results: list[WriteResult] = []
        while not file_queue.empty():
            path, storage_key, items = file_queue.get_nowait()
            with self.fs.create_stream(path, "wb") as stream:
                for item in sorted(items, key=lambda i: i.type != WriteItemType.BYTE_IO):
                    data = planner.resolve_data(item)
                    if isinstance(data, torch.Tensor):
                        data = data.detach().cpu()
                        if data.untyped_storage().nbytes() != data.nbytes:
                            data = data.clone()  # a view: store only its elements
                    results.append(_write_item(self.transforms, stream, data, item,
                                               storage_key, self.serialization_format))
                    del data
                if self.sync_files:
                    stream.flush()
                    os.fsync(stream.fileno())
        done: Future[list[WriteResult]] = Future()
        done.set_result(results)
        return done


def _serialized(data: object) -> io.BytesIO:
    """A ShardedObject as megatron's torch_dist strategy stores it: ``torch.save([data])``."""
    buffer = io.BytesIO()
    torch.save([data], buffer)
    buffer.seek(0)
    return buffer


def write_megatron_checkpoint(directory: str | Path, layout: MegatronLayout,
                              source: TensorSource) -> None:
    """Write ``layout``'s tensors, taking module tensor ``name`` from ``source(name)``
    (called once per stored chunk; ``source`` should cache a group's outputs)."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    items: list[WriteItem] = []
    chunks: dict[tuple[str, tuple[int, ...]], tuple[str, Chunk]] = {}
    for tensor in layout.tensors.values():
        for chunk in tensor.chunks:
            offsets = torch.Size(chunk.offsets)
            items.append(WriteItem(
                index=MetadataIndex(chunk.key, offsets),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=offsets, sizes=torch.Size(chunk.sizes)),
                    properties=TensorProperties(dtype=tensor.dtype),
                    size=torch.Size(chunk.global_shape),
                ),
            ))
            chunks[(chunk.key, chunk.offsets)] = (tensor.name, chunk)
    objects = dict(layout.objects)
    objects[ShardedObject("common_state", None, (1,), (0,)).unique_key] = {}
    items += [WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO) for key in objects]

    def resolve(item: WriteItem) -> torch.Tensor | io.BytesIO:
        if item.type == WriteItemType.BYTE_IO:
            return _serialized(objects[item.index.fqn])
        name, chunk = chunks[(item.index.fqn, tuple(item.index.offset))]
        tensor = source(name)
        expected = layout.tensors[name]
        if tuple(tensor.shape) != expected.shape:
            raise AssertionError(f"{name}: produced {tuple(tensor.shape)}, layout "
                                 f"says {expected.shape}")
        # No copy of a whole-tensor chunk: the writer copies a piece only when it is a
        # view into a larger storage (the SwiGLU halves).
        return tensor[chunk.local].to(expected.dtype).reshape(chunk.sizes)

    Path(directory).mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # A single-process save is what is meant here.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp_save({}, storage_writer=_StreamingWriter(str(directory)),
                     planner=_LazySavePlanner(items, resolve), no_dist=True)
        except CheckpointException as err:
            # torch wraps whatever failed while writing (a source read, the disk): raise
            # that error itself so callers and users see what went wrong.
            for exc, _ in err.failures.values():
                raise exc from None
            raise
    save_config(CheckpointingConfig("torch_dist", 1), str(directory))
