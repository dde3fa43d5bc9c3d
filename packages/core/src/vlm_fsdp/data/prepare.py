"""`data prepare`: conversation JSONL -> Megatron-Energon WebDataset shards (train and val splits).

Every image is decoded once here, so corrupt, missing and unusable images are found before training; its size is
recorded so the loader can plan packing without decoding. Images are stored as their original bytes.
"""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm
from vlm_fsdp.data.chat import SampleError, image_refs, normalize_messages
from vlm_fsdp.data.energon import SPLITS, index_dataset
from vlm_fsdp.data.images import ImageError, verify
from vlm_fsdp.errors import UserError

EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}
EXAMPLES = 5


@dataclass(kw_only=True)
class Summary:
    """What `prepare` wrote and what it skipped."""

    samples: Counter = field(default_factory=Counter)
    """Samples written per split."""
    images: int = 0
    """Images written (each stored once per sample)."""
    skipped: Counter = field(default_factory=Counter)
    """Skipped samples per reason."""
    examples: list[str] = field(default_factory=list)
    """The first few skipped samples as `file:line: reason`."""
    shards: list[str] = field(default_factory=list)

    def render(self, output: Path) -> str:
        lines = [
            f"wrote {plural(sum(self.samples.values()), 'sample')} "
            f"({', '.join(f'{s} {self.samples[s]}' for s in SPLITS)}), {plural(self.images, 'image')}, "
            f"{plural(len(self.shards), 'shard')} to {output}",
            f"skipped {plural(sum(self.skipped.values()), 'sample')}"
            + "".join(f"\n  {count:6d}  {reason}" for reason, count in self.skipped.most_common()),
        ]
        if self.examples:
            lines.append("first skipped:" + "".join(f"\n  {e}" for e in self.examples))
        return "\n".join(lines)


def plural(n: int, noun: str) -> str:
    """`1 sample`, `2 samples`."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


class ShardWriter:
    """Writes samples into `{split}-{n:06d}.tar` files of at most `per_shard` samples each."""

    def __init__(self, root: Path, split: str, per_shard: int, names: list[str]):
        self.root, self.split, self.per_shard, self.names = root, split, per_shard, names
        self.tar: tarfile.TarFile | None = None
        self.count = 0

    def write(self, key: str, parts: dict[str, bytes]) -> None:
        if self.count % self.per_shard == 0:
            self.close()
            name = f"{self.split}-{self.count // self.per_shard:06d}.tar"
            self.names.append(name)
            self.tar = tarfile.open(self.root / name, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 (closed by close())
        for part, data in parts.items():
            info = tarfile.TarInfo(f"{key}.{part}")
            info.size = len(data)
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None


def read_sample(line: str, base: Path, sample_id: str) -> dict[str, bytes]:
    """The shard parts of one JSONL line: `json` plus the image files; SampleError says why it is unusable."""
    try:
        sample = json.loads(line)
    except json.JSONDecodeError as err:
        raise SampleError("invalid JSON", str(err)) from None
    messages = normalize_messages(sample)
    parts, names, images = {}, {}, []
    for ref in image_refs(messages):
        if ref in names:
            continue
        path = base / ref
        if not path.is_file():
            raise SampleError("missing image", f"{ref} does not exist (paths are relative to the JSONL file)")
        data = path.read_bytes()
        try:
            kind, width, height = verify(data)
        except ImageError as err:
            raise SampleError("corrupt image", f"{ref}: {err}") from None
        names[ref] = f"img{len(names)}.{EXTENSIONS.get(kind, 'img')}"
        parts[names[ref]] = data
        images.append({"name": names[ref], "width": width, "height": height, "source": ref})
    for message in messages:
        for part in message["content"]:
            if part["type"] == "image":
                part["image"] = names[part["image"]]
    record = {"id": str(sample.get("id", sample_id)), "messages": messages, "images": images}
    return {"json": json.dumps(record, ensure_ascii=False).encode(), **parts}


def prepare(
    train: Path,
    output: Path,
    *,
    val: Path | None = None,
    val_fraction: float = 0.0,
    samples_per_shard: int = 1000,
    progress: bool = True,
) -> Summary:
    """Write the samples of `train` (and `val`, or a `val_fraction` of `train` chosen by a hash of each line) as an
    Energon dataset in `output`, which must be new or empty."""
    for path in (train, val):
        if path is not None and not path.is_file():
            raise UserError(f"{path} does not exist")
    if val is not None and val_fraction:
        raise UserError("give either a validation file or a validation fraction, not both")
    if not 0 <= val_fraction < 1:
        raise UserError(f"the validation fraction must be in [0, 1), got {val_fraction}")
    if samples_per_shard < 1:
        raise UserError("samples per shard must be at least 1")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"{output} exists and is not an empty directory: choose a new output directory")
    output.mkdir(parents=True, exist_ok=True)

    summary, names = Summary(), []
    writers = {split: ShardWriter(output, split, samples_per_shard, names) for split in SPLITS}
    inputs = [(train, None)] + ([(val, "val")] if val is not None else [])
    total = sum(_count_lines(path) for path, _ in inputs)
    with tqdm(total=total, unit=" samples", desc="prepare", disable=not progress) as bar:
        for path, forced_split in inputs:
            with path.open(encoding="utf-8") as lines:
                for number, line in enumerate(lines, 1):
                    bar.update()
                    if not line.strip():
                        continue
                    split = forced_split or _split_of(line, val_fraction)
                    key = f"{sum(summary.samples.values()):09d}"
                    try:
                        parts = read_sample(line, path.parent, f"{path.name}:{number}")
                    except SampleError as err:
                        summary.skipped[err.kind] += 1
                        if len(summary.examples) < EXAMPLES:
                            summary.examples.append(f"{path}:{number}: {err}")
                        continue
                    writers[split].write(key, parts)
                    summary.samples[split] += 1
                    summary.images += len(parts) - 1
    for writer in writers.values():
        writer.close()
    summary.shards = names
    if not summary.samples:
        raise UserError("no usable samples: nothing was written\n" + summary.render(output))
    index_dataset(output, names)
    return summary


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for _ in f)


def _split_of(line: str, val_fraction: float) -> str:
    """A stable train/val choice from the line's content (the same line always lands in the same split)."""
    return "val" if zlib.crc32(line.encode()) % 1_000_000 < val_fraction * 1_000_000 else "train"
