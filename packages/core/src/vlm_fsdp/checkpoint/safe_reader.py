"""Read torch.distributed.checkpoint (DCP) directories without running code from them.

DCP's own reader unpickles `.metadata` with `pickle.load`, and reads non-tensor values with
`torch.load(weights_only=False)`: a crafted checkpoint runs whatever it wants in the process that reads it. Here
`.metadata` is unpickled by an unpickler that builds only the classes DCP metadata consists of, its contents are
checked (types, shapes, byte ranges, file names) before DCP sees them, and `TensorLoadPlanner` refuses pickled
values. Tensor data is read by DCP with `torch.load(weights_only=True)`, PyTorch's restricted loader.

    from vlm_fsdp.checkpoint.safe_reader import load_tensors, read_metadata, reader

    metadata = read_metadata(path)                 # checked Metadata, or a UserError saying what is wrong
    load_tensors(state, path)                      # dcp.load of tensors only, errors as one-line UserErrors
    dcp.load(state, storage_reader=reader(path), planner=TensorLoadPlanner())   # the same by hand
"""

from __future__ import annotations

import io
import math
import pathlib
import pickle
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan
from vlm_fsdp.errors import UserError

METADATA = ".metadata"
MAX_NUMEL = 2**62
_MODULES = {
    "torch.distributed.checkpoint.metadata": (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    ),
    "torch.distributed.checkpoint.filesystem": ("_StorageInfo",),
    # Megatron's torch_dist keeps the save plans of every rank in its metadata (`all_local_plans`)
    "torch.distributed.checkpoint.planner": (
        "SavePlan",
        "WriteItem",
        "WriteItemType",
        "TensorWriteData",
        "BytesIOWriteData",
        "LoadPlan",
        "ReadItem",
        "LoadItemType",
    ),
    "torch": ("Size",),
    "torch.serialization": ("_get_layout",),  # how torch.layout pickles: a lookup by name
    "pathlib": ("PosixPath", "PurePosixPath", "PureWindowsPath"),  # StorageMeta.checkpoint_id
    "pathlib._local": ("PosixPath", "PurePosixPath", "PureWindowsPath"),  # the same, pickled by Python >= 3.13
}
ALLOWED_GLOBALS = frozenset((module, name) for module, names in _MODULES.items() for name in names)
_TORCH_VALUES = {
    name: value
    for name, value in vars(torch).items()
    if isinstance(value, (torch.dtype, torch.layout, torch.memory_format))
}
# a checkpoint written on Windows names its path with a class that cannot be built here
_STAND_INS = {
    ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,
    ("pathlib._local", "WindowsPath"): pathlib.PureWindowsPath,
}


def _short(text: str, limit: int = 120) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP metadata classes, torch sizes, dtypes, layouts and memory formats, and nothing else."""

    def __init__(self, data: bytes, source: Path) -> None:
        super().__init__(io.BytesIO(data))
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _TORCH_VALUES:
            return _TORCH_VALUES[name]
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if (module, name) in _STAND_INS:
            return _STAND_INS[module, name]
        raise UserError(
            f"{self.source} references {_short(f'{module}.{name}')}: refusing to unpickle it (DCP metadata holds "
            "only torch.distributed.checkpoint's own classes; this file was not written by it, or was tampered with)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UserError(f"{self.source} holds a persistent reference: refusing to unpickle it (not DCP metadata)")


def unpickle_metadata(file: Path) -> Any:
    """The object pickled in a `.metadata` file, built only from the classes DCP metadata consists of."""
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise UserError(
            f"{file.parent} has no {METADATA}: it is not a complete DCP checkpoint (or its save was interrupted)"
        ) from None
    except OSError as err:
        raise UserError(f"cannot read {file}: {err.strerror}") from None
    try:
        return _MetadataUnpickler(data, file).load()
    except UserError:
        raise
    except Exception as err:  # a damaged pickle fails in many ways; every one means the same to the user
        raise UserError(
            f"{file} is damaged: it is not readable DCP metadata ({_short(f'{type(err).__name__}: {err}')})"
        ) from None


# --- checking what the metadata says ------------------------------------------------------------------------


def _ints(value: Any) -> tuple[int, ...] | None:
    """`value` as a tuple of non-negative ints, or None when it is not one."""
    if not isinstance(value, (tuple, list)):
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_NUMEL for v in value):
        return None
    return tuple(value)


def _plain_file_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def _tensor_problem(fqn: str, meta: TensorStorageMetadata, storage: dict) -> str | None:
    properties = getattr(meta, "properties", None)
    if not isinstance(properties, TensorProperties) or not isinstance(getattr(properties, "dtype", None), torch.dtype):
        return f"tensor {fqn} has no valid dtype"
    size = _ints(getattr(meta, "size", None))
    if size is None or not isinstance(meta.size, torch.Size) or math.prod(size) >= MAX_NUMEL:
        return f"tensor {fqn} has no valid shape"
    chunks = getattr(meta, "chunks", None)
    if not isinstance(chunks, list) or not all(isinstance(c, ChunkStorageMetadata) for c in chunks):
        return f"tensor {fqn} has no valid list of pieces"
    covered = 0
    for chunk in chunks:
        offsets, sizes = _ints(getattr(chunk, "offsets", None)), _ints(getattr(chunk, "sizes", None))
        if offsets is None or sizes is None or not len(offsets) == len(sizes) == len(size):
            return f"tensor {fqn} has a piece of another rank than its shape {list(size)}"
        if any(o + s > d for o, s, d in zip(offsets, sizes, size, strict=True)):
            return f"tensor {fqn} has a piece at {list(offsets)} of {list(sizes)} outside its shape {list(size)}"
        covered += math.prod(sizes)
        if math.prod(sizes) and MetadataIndex(fqn, offsets) not in storage:
            return f"tensor {fqn} has a piece at {list(offsets)} that no data file holds"
    if covered != math.prod(size):
        return f"the pieces of tensor {fqn} hold {covered} of its {math.prod(size)} elements"
    return None


def _storage_problem(index: Any, info: Any) -> str | None:
    if not isinstance(index, MetadataIndex) or not isinstance(getattr(index, "fqn", None), str):
        return "an entry of its data index is not an index of a state-dict entry"
    if not isinstance(info, _StorageInfo) or not _plain_file_name(getattr(info, "relative_path", None)):
        return f"{index.fqn} is not stored in a file of the checkpoint directory"
    if _ints((getattr(info, "offset", None), getattr(info, "length", None))) is None:
        return f"{index.fqn} has an invalid byte range in {info.relative_path}"
    if getattr(info, "transform_descriptors", None):
        return (
            f"{index.fqn} is stored through transforms {info.transform_descriptors!r:.80}, which vlm-fsdp does not read"
        )
    return None


def metadata_problems(metadata: Any) -> list[str]:
    """What makes unpickled `.metadata` contents unusable: wrong types, shapes, pieces, byte ranges or file names."""
    if not isinstance(metadata, Metadata):
        return [f"it holds a {type(metadata).__name__}, not DCP Metadata"]
    entries, storage = getattr(metadata, "state_dict_metadata", None), getattr(metadata, "storage_data", None)
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        return ["its list of entries or its data index is missing"]
    problems = [p for index, info in storage.items() if (p := _storage_problem(index, info))]
    if problems:
        return problems
    for fqn, meta in entries.items():
        if not isinstance(fqn, str):
            problems.append(f"an entry is named by a {type(fqn).__name__}, not a string")
        elif isinstance(meta, TensorStorageMetadata):
            problems += [p] if (p := _tensor_problem(fqn, meta, storage)) else []
        elif isinstance(meta, BytesStorageMetadata):
            problems += [] if MetadataIndex(fqn) in storage else [f"object {fqn} is in no data file"]
        else:
            problems.append(f"entry {_short(fqn)} is a {type(meta).__name__}, neither a tensor nor an object")
    return problems


class SafeFileSystemReader(FileSystemReader):
    """DCP's file system reader whose `read_metadata` unpickles only DCP metadata classes and checks the result
    (or hands out `metadata` already read that way, to read a large checkpoint in many loads)."""

    def __init__(self, path: str | Path, metadata: Metadata | None = None) -> None:
        super().__init__(path)
        self.checked_metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = self.checked_metadata
        if metadata is None or kwargs.get("rank") is not None:
            metadata = _checked_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
        if not isinstance(getattr(metadata, "storage_meta", None), StorageMeta):
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _checked_metadata(file: Path) -> Metadata:
    metadata = unpickle_metadata(file)
    problems = metadata_problems(metadata)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise UserError(f"{file} is damaged: {problems[0]}{more}")
    return metadata


def reader(path: Path, metadata: Metadata | None = None) -> SafeFileSystemReader:
    """The storage reader every DCP read of vlm-fsdp uses (`dcp.load(..., storage_reader=reader(path))`);
    `metadata`: what `read_metadata(path)` returned, to skip reading it again."""
    return SafeFileSystemReader(path, metadata)


def read_metadata(path: Path) -> Metadata:
    """The checked metadata of the checkpoint directory `path`; a UserError says what is wrong with it."""
    if not Path(path).is_dir():
        raise UserError(f"{path} is not a directory: expected a DCP checkpoint directory")
    return reader(path).read_metadata()


def storage_problems(path: Path, metadata: Metadata) -> list[str]:
    """Data files that are missing or shorter than the byte ranges the metadata points into."""
    needed: dict[str, int] = defaultdict(int)
    owners: dict[str, set[str]] = defaultdict(set)
    for index, info in metadata.storage_data.items():
        needed[info.relative_path] = max(needed[info.relative_path], info.offset + info.length)
        owners[info.relative_path].add(index.fqn)
    problems = []
    for name, size in sorted(needed.items()):
        file = path / name
        examples = ", ".join(sorted(owners[name])[:3])
        if not file.is_file():
            problems.append(f"data file {name} is missing ({len(owners[name])} entries, e.g. {examples})")
        elif file.stat().st_size < size:
            problems.append(
                f"data file {name} is truncated: {file.stat().st_size} of {size} bytes "
                f"({len(owners[name])} entries, e.g. {examples})"
            )
    return problems


# --- loading ------------------------------------------------------------------------------------------------


def _refuse_objects(names: list[str]) -> UserError:
    return UserError(
        f"the checkpoint stores {', '.join(_short(n, 80) for n in names[:3])} as pickled objects, which vlm-fsdp "
        "does not unpickle (unpickling runs code from the file); expected tensors"
    )


class TensorLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner for callers that load tensors only: an entry the checkpoint stores as a pickled
    object (which DCP would read with `torch.load(weights_only=False)`) is refused before anything is read."""

    def __init__(self, *, allow_partial_load: bool = True, **kwargs: Any) -> None:
        super().__init__(allow_partial_load=allow_partial_load, **kwargs)

    def create_local_plan(self) -> LoadPlan:
        plan = super().create_local_plan()
        objects = sorted({item.dest_index.fqn for item in plan.items if item.type == LoadItemType.BYTE_IO})
        if objects:
            raise _refuse_objects(objects)
        return plan

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        raise _refuse_objects([read_item.dest_index.fqn])


class PlainObjectLoadPlanner(TensorLoadPlanner):
    """Also reads objects, with PyTorch's restricted loader (`weights_only=True`: numbers, strings, containers and
    tensors, no code): for the step and the like in checkpoints of older vlm-fsdp versions."""

    def create_local_plan(self) -> LoadPlan:
        return DefaultLoadPlanner.create_local_plan(self)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            loaded = torch.load(value, weights_only=True)
        except Exception as err:
            raise UserError(
                f"object {fqn} is not a plain value ({_short(str(err), 200)}): refusing to load it"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def _failures(error: BaseException) -> Iterator[BaseException]:
    if isinstance(error, CheckpointException):
        for wrapped, _ in error.failures.values():
            yield from _failures(wrapped)
    else:
        yield error


@contextmanager
def dcp_errors(action: str, hint: str = "") -> Iterator[None]:
    """Turn what DCP raises (every failure wrapped in a CheckpointException with tracebacks of all ranks) back
    into one clear error: Ctrl-C stays a KeyboardInterrupt, a UserError stays itself, and anything else becomes a
    UserError saying that `action` failed, how, and `hint`."""
    try:
        yield
    except (CheckpointException, Exception) as error:
        if isinstance(error, UserError):
            raise
        failures = list(_failures(error))
        for kind in (KeyboardInterrupt, UserError):
            found = [f for f in failures if isinstance(f, kind)]
            if found:
                raise found[0] from None
        first = next((f for f in failures if not isinstance(f, Exception)), failures[0])
        if not isinstance(first, Exception):
            raise first from None
        raise UserError(f"{action} failed: {_short(f'{type(first).__name__}: {first}', 400)}{hint}") from None


@contextmanager
def single_process() -> Iterator[None]:
    """Silence DCP's warning that it runs in one process, which the converters and `inspect` always do."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def load_tensors(state: dict[str, Any], path: Path, *, metadata: Metadata | None = None,
                 planner: DefaultLoadPlanner | None = None, no_dist: bool = False) -> None:  # fmt: skip
    """`dcp.load(state, ...)` of tensors from the checkpoint at `path`, checked and safe: the metadata through
    `reader` (or `metadata`, from `read_metadata(path)`), missing or truncated data files refused up front, pickled
    objects refused (`TensorLoadPlanner`), and every failure one UserError (Ctrl-C a KeyboardInterrupt)."""
    metadata = metadata or read_metadata(path)
    problems = storage_problems(Path(path), metadata)
    if problems:
        raise UserError(f"checkpoint {path} is damaged: {'; '.join(problems[:3])}")
    with dcp_errors(f"reading {path}", " (is the checkpoint damaged? `vlm-fsdp inspect` checks it)"), single_process():
        dcp.load(state, storage_reader=reader(path, metadata), planner=planner or TensorLoadPlanner(), no_dist=no_dist)


def read_objects(path: Path, keys: list[str]) -> dict[str, Any]:
    """The plain values (numbers, strings, containers) stored as objects under `keys`, read without unpickling
    anything else (see `PlainObjectLoadPlanner`)."""
    state: dict[str, Any] = dict.fromkeys(keys, b"")
    load_tensors(state, path, planner=PlainObjectLoadPlanner(), no_dist=True)
    return state
