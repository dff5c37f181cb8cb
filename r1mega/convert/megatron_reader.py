"""Read module tensors out of a megatron-core distributed checkpoint (torch_dist).

The checkpoint may have been saved at any layout (TP/PP/EP/DP, weights only or a full
training checkpoint with optimizer state): it stores global tensors in chunks, and this
reader assembles any box of a global tensor from whichever chunks overlap it, through
``torch.distributed.checkpoint``'s read items, without a process group. One module
tensor (one layer's weight, one expert's) is read at a time; one stored as a single
record is loaded directly (torch's reader would load it and then copy it into the
destination, doubling the peak for the 1.7 GiB embedding of DeepSeek-V3).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import _create_file_view
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from r1mega.convert.errors import ConversionError, name_list
from r1mega.convert.megatron_layout import MegatronLayout, ModuleTensor


class _BoxPlanner(LoadPlanner):
    """Copies the read items of one request into one destination box; the planning
    steps of a full ``dcp.load`` are not used (items come from
    ``create_read_items_for_chunk_list``)."""

    def __init__(self, dest: torch.Tensor) -> None:
        self.dest = dest

    def set_up_planner(self, *args: object, **kwargs: object) -> None:
        raise NotImplementedError

    def create_local_plan(self) -> LoadPlan:
        raise NotImplementedError

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        raise NotImplementedError

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        raise NotImplementedError

    def load_bytes(self, read_item: ReadItem, value: object) -> None:
        raise NotImplementedError

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        return narrow_tensor_by_index(self.dest, read_item.dest_offsets, read_item.lengths)

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        """Nothing to do: the data was copied into the box in place."""


class MegatronCheckpointReader:
    """Global tensors of a torch_dist checkpoint directory, read box by box."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not (self.directory / "metadata.json").exists() or not (
                self.directory / ".metadata").exists():
            raise ConversionError(
                f"{self.directory} is not a megatron distributed checkpoint (torch_dist): "
                "metadata.json or .metadata is missing")
        self._reader = FileSystemReader(str(self.directory))
        try:
            self.metadata: Metadata = self._reader.read_metadata()
        except Exception as e:  # noqa: BLE001 - an unpickling error of any kind
            raise ConversionError(f"{self.directory / '.metadata'} cannot be read "
                                  f"({type(e).__name__}: {e})") from None
        self._reader.set_up_storage_reader(self.metadata, True)
        self._check_files()

    def _check_files(self) -> None:
        """Every byte range the metadata points at lies inside its file: a truncated or
        missing shard is named before any tensor is read (or memory allocated for it)."""
        needed: dict[str, int] = {}
        for info in self.metadata.storage_data.values():
            end = int(info.offset) + int(info.length)
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
        for name, end in sorted(needed.items()):
            path = self.directory / name
            if not path.is_file():
                raise ConversionError(f"{path} is missing (listed in {self.directory}/.metadata)")
            size = path.stat().st_size
            if size < end:
                raise ConversionError(f"{path} is truncated: {size} bytes, the checkpoint's "
                                      f"metadata needs {end}")

    def check(self, layout: MegatronLayout) -> None:
        """Every global tensor the layout needs is stored with the same global shape."""
        missing, mismatched = [], []
        stored = self.metadata.state_dict_metadata
        for key, (shape, _) in sorted(layout.global_keys().items()):
            md = stored.get(key)
            if not isinstance(md, TensorStorageMetadata):
                missing.append(key)
            elif tuple(md.size) != shape:
                mismatched.append(f"{key}: checkpoint has {tuple(md.size)}, model expects "
                                  f"{shape}")
        if missing:
            raise ConversionError(f"missing tensors in {self.directory}:\n{name_list(missing)}")
        if mismatched:
            raise ConversionError("shape mismatch:\n" + name_list(mismatched))

    def dtype(self, key: str) -> torch.dtype:
        md = self.metadata.state_dict_metadata[key]
        assert isinstance(md, TensorStorageMetadata)
        return md.properties.dtype

    def _stored_whole(self, tensor: ModuleTensor) -> torch.Tensor | None:
        """The module tensor when it is stored as exactly one record (a checkpoint written
        at TP=1 or by the converter), loaded without the extra copy of the general path;
        else None."""
        if len(tensor.chunks) != 1:
            return None
        chunk = tensor.chunks[0]
        md = self.metadata.state_dict_metadata[chunk.key]
        assert isinstance(md, TensorStorageMetadata)
        if not any(tuple(c.offsets) == chunk.offsets and tuple(c.sizes) == chunk.sizes
                   for c in md.chunks):
            return None
        info = self.metadata.storage_data[MetadataIndex(chunk.key, torch.Size(chunk.offsets))]
        if getattr(info, "transform_descriptors", None):
            return None
        with open(self.directory / info.relative_path, "rb") as f:
            record = torch.load(_create_file_view(f, info.offset, info.length),
                                map_location="cpu", weights_only=True)
        return record.reshape(tensor.shape)

    def read(self, tensor: ModuleTensor) -> torch.Tensor:
        """The module tensor, assembled from its chunks, in the stored dtype."""
        whole = self._stored_whole(tensor)
        if whole is not None:
            return whole
        out = torch.empty(tensor.shape, dtype=self.dtype(tensor.chunks[0].key))
        for chunk in tensor.chunks:
            box = out[chunk.local]
            for _ in range(len(chunk.sizes) - box.dim()):
                box = box.unsqueeze(0)  # megatron's prepended (layer / expert) axes
            md = self.metadata.state_dict_metadata[chunk.key]
            items = create_read_items_for_chunk_list(
                chunk.key, md, [ChunkStorageMetadata(torch.Size(chunk.offsets),
                                                     torch.Size(chunk.sizes))])
            self._reader.read_data(LoadPlan(items), _BoxPlanner(box)).wait()
        return out
