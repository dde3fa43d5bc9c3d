"""The Megatron-Energon side: index written shards as an Energon dataset, and read its samples by index.

A prepared dataset is a plain Energon WebDataset (`CrudeWebdataset` in `.nv-meta/dataset.yaml`, splits `train` and
`val`), so Energon's own tools (`energon info`, `get_train_dataset` with a cooker) work on it. Each sample has a
`json` part (the conversation, its images' names and sizes, its id) and one part per image (`img0.jpg`, ...).

The loader reads samples through Energon's random-access tar reader (`ShardInfosITarReader` over the split's
shards, which Energon's own loaders use underneath) rather than through `get_train_dataset`; `loader.py` says why.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

from vlm_fsdp.errors import UserError

DATASET_YAML = "__module__: megatron.energon\n__class__: CrudeWebdataset\n"
SPLITS = ("train", "val")


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
    (root / ".nv-meta" / "dataset.yaml").write_text(DATASET_YAML)


class SplitReader:
    """Random access to the samples of one split of a prepared dataset; opens its files lazily, so it can be
    pickled into worker processes."""

    def __init__(self, root: str | Path, split: str):
        from megatron.energon.epathlib import EPath
        from megatron.energon.flavors.webdataset.metadata import WebdatasetMeta

        self.root, self.split = Path(root), split
        if not (self.root / ".nv-meta" / "split.yaml").is_file():
            raise UserError(
                f"{self.root} is not a prepared dataset (no .nv-meta/split.yaml): make one from a conversation "
                "JSONL with `vlm-fsdp data prepare INPUT.jsonl OUTPUT_DIR`"
            )
        try:
            meta = WebdatasetMeta.from_config(path=EPath(self.root), split_part=split)
        except Exception as err:  # Energon raises assorted errors for a missing or empty split
            hint = " (`vlm-fsdp data prepare` makes one with --val or --val-fraction)" if split == "val" else ""
            raise UserError(f"{self.root} has no samples in a '{split}' split{hint}: {err}") from None
        self.shards = meta.shards
        self.excluded = meta.sample_excludes
        self.length = sum(shard.count for shard in self.shards)
        self._readers: dict[bool, Any] = {}

    def __len__(self) -> int:
        return self.length

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_readers": {}}

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
        raw = self._reader(json_only=True)[index]
        return None if raw is None else json.loads(raw["json"])

    def sample(self, index: int) -> dict | None:
        """Every part of sample `index` by part name (`json` decoded; images as bytes), None when excluded."""
        raw = self._reader(json_only=False)[index]
        if raw is None:
            return None
        parts = {k: v for k, v in raw.items() if not k.startswith("__")}
        parts["json"] = json.loads(parts["json"])
        return parts
