"""Sharded tensors under their global names and shapes, the way torch.distributed.checkpoint stores them.

Megatron-FSDP shards every parameter into uneven runs of rows over its data-parallel group (dense parameters over
all ranks, experts over the expert-data-parallel group), and a rank's run can be empty; without sharding
(`no_shard`) every rank of the group holds all rows, and with hybrid sharding the outer groups hold copies. Under
expert parallelism a rank's experts tensor, and the Adam moments that go with it, hold only that rank's experts.
`global_view` tells DCP where each rank's piece of such a DTensor sits in one global tensor: after the rows of the
lower ranks of its group (one all-gather per group for all tensors at once) and, for experts, after the experts of
the lower expert-parallel ranks; the global shape counts every expert. A checkpoint written through it holds plain
global tensors (`model.<name>`, `optimizer.state.<name>.exp_avg`, ...) with each expert once, at its global index:
it loads at any number of ranks and any expert-parallel size, and in a single process for conversion.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
from torch.distributed.tensor import DTensor, Replicate, Shard

Path = tuple[str, ...]


def _dtensors(tree: dict, path: Path = ()) -> Iterator[tuple[Path, DTensor]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _dtensors(value, (*path, key))
        elif isinstance(value, DTensor):
            yield (*path, key), value


def _shard_group(path: Path, tensor: DTensor):
    """The process group over which `tensor`'s rows are split (None when every rank holds all of them): a
    Megatron-FSDP tensor is split along dimension 0 over at most one mesh dimension and replicated over the others
    (the outer groups of hybrid sharding)."""
    sharded = [dim for dim, p in enumerate(tensor.placements) if p == Shard(0)]
    others = [p for p in tensor.placements if p != Shard(0)]
    assert len(sharded) <= 1 and all(isinstance(p, Replicate) for p in others), (
        f"{'.'.join(path)}: unexpected placements {tensor.placements}"
    )
    return tensor.device_mesh.get_group(sharded[0]) if sharded else None


def _row_offsets(leaves: list[tuple[Path, DTensor]]) -> list[int]:
    """For each DTensor, the rows its group's lower ranks hold before this rank's (none when it is replicated)."""
    by_group: dict[Any, list[int]] = {}
    for index, (path, tensor) in enumerate(leaves):
        group = _shard_group(path, tensor)
        if group is not None:
            by_group.setdefault(group, []).append(index)
    offsets = [0] * len(leaves)
    for group, indices in by_group.items():
        size, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
        local = leaves[indices[0]][1].to_local()
        rows = torch.tensor([leaves[i][1].to_local().shape[0] for i in indices], dtype=torch.int64, device=local.device)
        gathered = torch.empty(size * len(indices), dtype=torch.int64, device=local.device)
        torch.distributed.all_gather_into_tensor(gathered, rows, group=group)
        before = gathered.view(size, len(indices))[:rank].sum(dim=0).tolist()
        for i, row in zip(indices, before, strict=True):
            offsets[i] = row
    return offsets


def _write_items(chunk: ChunkStorageMetadata, size: torch.Size):
    def write_items(fqn: str, tensor: DTensor) -> list[WriteItem]:
        local = tensor.to_local()
        if local.numel() == 0:
            return []
        properties = TensorProperties.create_from_tensor(local)
        data = TensorWriteData(chunk=chunk, properties=properties, size=size)
        return [WriteItem(type=WriteItemType.SHARD, index=MetadataIndex(fqn, chunk.offsets), tensor_data=data)]

    return write_items


@torch.no_grad()
def global_view(tree: dict, *, is_expert: Callable[[Path], bool], ep_rank: int, ep_size: int) -> dict:
    """A copy of the nested state dict `tree` whose DTensors are views of the same memory that DCP saves into, and
    loads from, their global tensors. `is_expert(path)`: the DTensor at `path` holds this rank's experts (along
    dimension 0). Every rank of a group must pass the same paths: this is a collective."""
    leaves = sorted(_dtensors(tree))
    offsets = _row_offsets(leaves)
    out = _copy_dicts(tree)
    for (path, tensor), row_offset in zip(leaves, offsets, strict=True):
        local = tensor.to_local()
        shape = list(tensor.shape)
        if is_expert(path):
            row_offset += ep_rank * shape[0]
            shape[0] *= ep_size
        size = torch.Size(shape)
        chunk = ChunkStorageMetadata(offsets=torch.Size([row_offset, *[0] * (len(shape) - 1)]), sizes=local.shape)
        view = DTensor.from_local(
            local,
            device_mesh=tensor.device_mesh,
            placements=tensor.placements,
            run_check=False,
            shape=size,
            stride=torch.empty(size, device="meta").stride(),
        )
        view._local_tensor.__create_chunk_list__ = lambda chunk=chunk: [chunk]
        view._local_tensor.__create_write_items__ = _write_items(chunk, size)
        parent = out
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = view
    return out


def _copy_dicts(tree: dict) -> dict:
    return {k: _copy_dicts(v) if isinstance(v, dict) else v for k, v in tree.items()}
