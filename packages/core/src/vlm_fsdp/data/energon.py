"""The Megatron-Energon side: index written shards as an Energon dataset, and read its samples by index.

A prepared dataset is a plain Energon WebDataset (`CrudeWebdataset` in `.nv-meta/dataset.yaml`, splits `train` and
`val`), so Energon's own tools (`energon info`, `get_train_dataset` with a cooker) work on it. Each sample has a
`json` part (the conversation, its images' names and sizes, its id) and one part per image (`img0.jpg`, ...).

The loader reads samples through Energon's random-access tar reader (`ShardInfosITarReader` over the split's
shards, which Energon's own loaders use underneath) rather than through `get_train_dataset`; `loader.py` says why.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import itertools
import json
import struct
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlm_fsdp.data.chat import SampleError, image_refs, normalize_messages
from vlm_fsdp.errors import UserError

DATASET_YAML = "__module__: megatron.energon\n__class__: CrudeWebdataset\n"
SPLITS = ("train", "val")
META = ".nv-meta"
INFO = ".info.json"
OLD_INFO = ".info.yaml"
ITAR_SUFFIX = ".tar.idx"
SIDES = ("width", "height")
PREPARE_AGAIN = "prepare the dataset again with `vlm-fsdp data prepare`"


def index_dataset(root: Path, shards: list[str]) -> None:
    """Run Energon's prepare step on written shards: tar indexes, sample index, split.yaml and dataset.yaml."""
    from megatron.energon.epathlib import EPath
    from megatron.energon.flavors import BaseWebdatasetFactory

    with contextlib.redirect_stdout(io.StringIO()):  # Energon prints its progress; the caller reports instead
        BaseWebdatasetFactory.prepare_dataset(
            EPath(root),
            shards,
            # regular expressions without backslashes: Energon passes them through braceexpand, which drops them
            split_parts_patterns=[(split, f"{split}-[0-9]+[.]tar$") for split in SPLITS],
            shuffle_seed=None,
            workers=1,
        )
    (root / META / "dataset.yaml").write_text(DATASET_YAML)


class DatasetError(UserError):
    """A prepared dataset that cannot be read as it is: a file is missing, empty, truncated or damaged (the message
    names it)."""


class NoSplitError(UserError):
    """The dataset has no samples in the split asked for."""


class SplitReader:
    """Random access to the samples of one split of a prepared dataset; opens its files lazily, so it can be
    pickled into worker processes. A damaged file raises DatasetError; `check()` looks for damage up front."""

    def __init__(self, root: str | Path, split: str):
        self.root, self.split = Path(root), split
        if not (self.root / META / "split.yaml").is_file():
            raise UserError(
                f"{self.root} is not a prepared dataset (no {META}/split.yaml): make one from a conversation "
                "JSONL with `vlm-fsdp data prepare INPUT.jsonl OUTPUT_DIR`"
            )
        meta = _split_meta(self.root, split)
        self.shards = meta.shards
        self.excluded = meta.sample_excludes
        self.ends = list(itertools.accumulate(shard.count for shard in self.shards))
        self.length = self.ends[-1] if self.ends else 0
        self._readers: dict[bool, Any] = {}

    def __len__(self) -> int:
        return self.length

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_readers": {}}

    def check(self) -> None:
        """DatasetError unless every shard of the split and its tar index are complete: the files exist, the index
        has one offset per sample, the shard is as long as the index says, and tar headers start its first and last
        sample. Reads a few bytes per shard, not the samples."""
        for shard in self.shards:
            _check_shard(self.root / shard.name, shard.count)

    def _reader(self, json_only: bool):
        if json_only not in self._readers:
            from megatron.energon.epathlib import EPath
            from megatron.energon.flavors.webdataset.itar_reader import ShardInfosITarReader

            self._readers[json_only] = ShardInfosITarReader(
                EPath(self.root),
                self.shards,
                part_filter=(lambda ext: ext == "json") if json_only else None,
                sample_filter=lambda key: key not in self.excluded,
            )
        return self._readers[json_only]

    def meta(self, index: int) -> dict | None:
        """The `json` part of sample `index` (None when split.yaml excludes the sample)."""
        raw = self._read(index, json_only=True)
        return None if raw is None else self._record(index, raw)

    def sample(self, index: int) -> dict | None:
        """Every part of sample `index` by part name (`json` decoded; images as bytes), None when excluded."""
        raw = self._read(index, json_only=False)
        if raw is None:
            return None
        parts = {k: v for k, v in raw.items() if not k.startswith("__")}
        parts["json"] = self._record(index, raw)
        return parts

    def locate(self, index: int) -> tuple[Path, int]:
        """The tar file that holds sample `index`, and the sample's position in it."""
        shard = bisect.bisect_right(self.ends, index)
        return self.root / self.shards[shard].name, index - (self.ends[shard - 1] if shard else 0)

    def _read(self, index: int, json_only: bool) -> dict | None:
        if not 0 <= index < self.length:
            raise IndexError(f"sample {index} is not in the {self.length} samples of the '{self.split}' split")
        try:
            return self._reader(json_only)[index]
        except Exception as err:  # Energon and tarfile raise assorted errors on damaged bytes
            self._readers.pop(json_only, None)
            raise self._damaged(index, f"cannot read it: {_reason(err)}") from None

    def _record(self, index: int, raw: dict) -> dict:
        """The sample's decoded `json` part, checked to be what `data prepare` writes."""
        if "json" not in raw:
            raise self._damaged(index, "it has no json part")
        try:
            record = json.loads(raw["json"])
            _check_record(record)
        except (ValueError, TypeError, RecursionError, SampleError) as err:
            raise self._damaged(index, f"its json part is damaged: {_reason(err)}") from None
        return record

    def _damaged(self, index: int, what: str) -> DatasetError:
        path, position = self.locate(index)
        return DatasetError(f"{path} is damaged at its sample {position}: {what}; {PREPARE_AGAIN}")


def _split_meta(root: Path, split: str):
    """Energon's metadata of one split: its shards, their sample counts and excluded samples."""
    from megatron.energon.epathlib import EPath
    from megatron.energon.flavors.webdataset.empty_dataset_error import EmptyDatasetError
    from megatron.energon.flavors.webdataset.metadata import WebdatasetMeta

    splits, counts = _check_meta_files(root)
    if not splits.get(split):
        hint = " (`vlm-fsdp data prepare` makes one with --val or --val-fraction)" if split == "val" else ""
        raise NoSplitError(f"{root} has no samples in a '{split}' split{hint}")
    for name in _shard_names(root, splits[split]):
        if name not in counts:
            raise DatasetError(
                f"{root / META} lists no sample count for {name} of the '{split}' split; {PREPARE_AGAIN}"
            )
    try:
        return WebdatasetMeta.from_config(path=EPath(root), split_part=split)
    except EmptyDatasetError:
        raise NoSplitError(f"{root} has no samples in a '{split}' split") from None
    except Exception as err:  # Energon raises assorted errors for metadata it cannot use
        raise DatasetError(f"the metadata in {root / META} is damaged: {_reason(err)}; {PREPARE_AGAIN}") from None


def _shard_names(root: Path, patterns: list[str]) -> list[str]:
    """Shard names of split.yaml's brace patterns (`train-{000000..000003}.tar`)."""
    from braceexpand import braceexpand

    try:
        return [name for pattern in patterns for name in braceexpand(pattern)]
    except Exception as err:  # braceexpand's errors of an unbalanced pattern
        raise DatasetError(f"{root / META / 'split.yaml'} is damaged: {_reason(err)}; {PREPARE_AGAIN}") from None


def _check_meta_files(root: Path) -> tuple[dict[str, list], dict[str, int]]:
    """The split parts of split.yaml and the shard sample counts of .info.json, checked for shape; DatasetError
    names the file that is missing or damaged."""
    import yaml

    splits = _load_meta_file(root / META / "split.yaml", yaml.safe_load)
    parts = splits.get("split_parts") if isinstance(splits, dict) else None
    if not isinstance(parts, dict) or not all(
        isinstance(names, list | None) and all(isinstance(n, str) for n in names or []) for names in parts.values()
    ):
        raise DatasetError(f"{root / META / 'split.yaml'} is damaged: no split_parts with lists of shard names")
    info_path = root / META / INFO
    if not info_path.is_file() and (root / META / OLD_INFO).is_file():
        info_path = root / META / OLD_INFO  # what older Energon versions wrote
    info = _load_meta_file(info_path, yaml.safe_load if info_path.name == OLD_INFO else json.loads)
    counts = info.get("shard_counts") if isinstance(info, dict) else None
    if not isinstance(counts, dict) or not all(
        isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts.values()
    ):
        raise DatasetError(f"{info_path} is damaged: no shard_counts with a sample count per shard")
    return {split: names or [] for split, names in parts.items()}, counts


def _load_meta_file(path: Path, parse: Callable[[str], Any]) -> Any:
    try:
        return parse(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path} is missing; {PREPARE_AGAIN}") from None
    except OSError as err:
        raise DatasetError(f"cannot read {path}: {err.strerror or err}") from None
    except Exception as err:  # JSON, YAML and decoding errors of a damaged file
        raise DatasetError(f"{path} is damaged: {_reason(err)}; {PREPARE_AGAIN}") from None


def _check_shard(path: Path, count: int) -> None:
    """DatasetError unless the shard and its `.tar.idx` (Energon's sample offsets: one per sample, then the end of
    the last one) agree and tar headers start its first and last sample."""
    index = path.with_suffix(ITAR_SUFFIX)
    try:
        size = path.stat().st_size
        offsets = index.read_bytes()
    except FileNotFoundError as err:
        raise DatasetError(f"{err.filename} is missing; {PREPARE_AGAIN}") from None
    except OSError as err:
        raise DatasetError(f"cannot read {err.filename}: {err.strerror}") from None
    if size == 0:
        raise DatasetError(f"{path} is empty; {PREPARE_AGAIN}")
    if len(offsets) != 8 * (count + 1):
        raise DatasetError(
            f"{index} is damaged: {len(offsets)} bytes, not the {8 * (count + 1)} of {count} sample offsets; "
            + PREPARE_AGAIN
        )
    starts = struct.unpack(f"{count + 1}Q", offsets)
    if starts[0] != 0 or any(b < a for a, b in itertools.pairwise(starts)):
        raise DatasetError(f"{index} is damaged: its sample offsets do not increase from 0; {PREPARE_AGAIN}")
    if starts[-1] > size:
        raise DatasetError(
            f"{path} is truncated: {size:,} bytes, but its samples end at byte {starts[-1]:,}; {PREPARE_AGAIN}"
        )
    for start in {starts[0], starts[-2]} if count else ():
        _check_tar_header(path, start)


def _check_tar_header(path: Path, offset: int) -> None:
    try:
        with path.open("rb") as file:
            file.seek(offset)
            tarfile.TarInfo.frombuf(file.read(tarfile.BLOCKSIZE), tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError as err:
        raise DatasetError(f"{path} is damaged: no tar header at byte {offset:,} ({err}); {PREPARE_AGAIN}") from None
    except OSError as err:
        raise DatasetError(f"cannot read {path}: {err.strerror or err}") from None


def _check_record(record: Any) -> None:
    """ValueError or SampleError unless `record` is a sample as `data prepare` writes it."""
    if not isinstance(record, dict) or not isinstance(record.get("id"), str):
        raise ValueError('not an object with an "id" string')
    messages = normalize_messages(record)
    images = record.get("images")
    if not isinstance(images, list) or not all(_is_image_entry(image) for image in images):
        raise ValueError('"images" is not a list of {"name", "width", "height"} entries')
    missing = set(image_refs(messages)) - {image["name"] for image in images}
    if missing:
        raise ValueError(f'"images" has no entry for {sorted(missing)[0]}')


def _is_image_entry(image: Any) -> bool:
    return (
        isinstance(image, dict)
        and isinstance(image.get("name"), str)
        and all(isinstance(image.get(k), int) and not isinstance(image[k], bool) and image[k] > 0 for k in SIDES)
    )


def _reason(err: Exception) -> str:
    """An error's message on one line (YAML's span several), for messages that name the damaged file."""
    return " ".join(str(err).split()) or type(err).__name__
