"""`data prepare`: conversation JSONL -> Megatron-Energon WebDataset shards (train and val splits).

Every image is decoded once here, so corrupt, missing and unusable images are found before training; its size is
recorded so the loader can plan packing without decoding. Images are stored as their original bytes.

No sample stops the run: a line that is not UTF-8, not JSON or not a conversation, or whose images are missing,
outside the JSONL file's folder, unreadable or undecodable, is skipped, counted and written to `prepare_report.jsonl`
in the dataset (one JSON object per skipped line: file, line, id, start, reason, detail). Only mistakes about the
whole run (a missing input, a non-empty output, no usable sample at all) raise UserError.

The dataset is written into a hidden sibling of the output directory and renamed into place once complete (shards,
index and report), so a failed or interrupted run leaves nothing that blocks a rerun or passes for a dataset.
"""

from __future__ import annotations

import contextlib
import errno
import io
import itertools
import json
import os
import shutil
import stat
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm
from vlm_fsdp.data.chat import BAD_FORMAT, SampleError, brief, check_text, image_refs, normalize_messages
from vlm_fsdp.data.energon import SPLITS, index_dataset
from vlm_fsdp.data.images import TOO_LARGE, ImageError, verify
from vlm_fsdp.data.staging import make_staging, output_target, publish
from vlm_fsdp.errors import UserError

EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}
REPORT = "prepare_report.jsonl"
CONSOLE_SKIPS = 20
"""Skipped samples listed on the console; the report lists all of them."""
MAX_LINE_BYTES = 64 * 2**20
MAX_IMAGE_BYTES = 256 * 2**20
START_CHARS = 80
"""Characters of a skipped line the report quotes."""
DETAIL_CHARS = 1000
"""Marks a directory as this module's unfinished output (with the process that writes it)."""
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
UTF8_BOM = b"\xef\xbb\xbf"

NOT_UTF8 = "not UTF-8"
INVALID_JSON = "invalid JSON"
LINE_TOO_LONG = "line too long"
BAD_PATH = "bad image path"
OUTSIDE = "image outside the JSONL folder"
MISSING = "missing image"
UNREADABLE = "unreadable image"


@dataclass(frozen=True, kw_only=True)
class Skip:
    """A skipped sample: where it is, how its line starts, and why it was skipped."""

    file: Path
    line: int
    kind: str
    detail: str
    sample_id: str | None = None
    start: str = ""

    def as_json(self) -> str:
        """One line of the report (ASCII: escapes keep lone surrogates and control characters readable)."""
        return json.dumps(
            {
                "file": str(self.file),
                "line": self.line,
                "id": self.sample_id,
                "start": self.start,
                "reason": self.kind,
                "detail": self.detail[:DETAIL_CHARS],
            }
        )

    def render(self) -> str:
        return printable(f"{self.file}:{self.line}: {self.kind}: {self.detail}", limit=300)


@dataclass(kw_only=True)
class Summary:
    """What `prepare` wrote and what it skipped."""

    samples: Counter = field(default_factory=Counter)
    """Samples written per split."""
    images: int = 0
    """Images written (each stored once per sample)."""
    skipped: Counter = field(default_factory=Counter)
    """Skipped samples per reason."""
    examples: list[Skip] = field(default_factory=list)
    """The first CONSOLE_SKIPS skipped samples (the report in the dataset lists all of them)."""
    shards: list[str] = field(default_factory=list)

    def add_skip(self, skip: Skip, report: IO[str]) -> None:
        self.skipped[skip.kind] += 1
        if len(self.examples) < CONSOLE_SKIPS:
            self.examples.append(skip)
        report.write(skip.as_json() + "\n")

    def render(self, output: Path) -> str:
        skipped = sum(self.skipped.values())
        lines = [
            printable(
                f"wrote {plural(sum(self.samples.values()), 'sample')} "
                f"({', '.join(f'{s} {self.samples[s]}' for s in SPLITS)}), {plural(self.images, 'image')}, "
                f"{plural(len(self.shards), 'shard')} to {output}"
            ),
            f"skipped {plural(skipped, 'sample')}"
            + "".join(f"\n  {count:6d}  {reason}" for reason, count in self.skipped.most_common()),
        ]
        if self.examples:
            lines += [f"  {skip.render()}" for skip in self.examples]
            report = printable(str(output / REPORT))
            more = skipped - len(self.examples)
            lines.append(f"  and {more} more, see {report}" if more else f"  (also listed in {report})")
        return "\n".join(lines)

    def nothing_usable(self, inputs: list[Path]) -> str:
        """The one-line message of a run without a single usable sample."""
        names = " and ".join(str(path) for path in inputs)
        if not self.skipped:
            return printable(f"no usable sample: {names} holds no sample (only blank lines)")
        counts = ", ".join(f"{reason}: {count}" for reason, count in self.skipped.most_common())
        return printable(
            f"no usable sample: all {sum(self.skipped.values())} samples of {names} were skipped ({counts}); "
            f"the first: {self.examples[0].render()}",
            limit=1000,
        )


def plural(n: int, noun: str) -> str:
    """`1 sample`, `2 samples`."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def printable(text: str, limit: int = 600) -> str:
    """`text` on one line, safe for a terminal: cut at `limit` characters, control characters and lone surrogates
    escaped."""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode() for c in text)


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


def read_sample(line: bytes | str, base: Path, sample_id: str, *, allow_outside_paths: bool = False) -> dict:
    """The shard parts of one JSONL line: `json` plus the image files; SampleError says why it is unusable.

    Image paths are relative to `base` (the JSONL file's folder) and must lead to a file inside it, symlinks
    followed, unless `allow_outside_paths`."""
    sample = parse_line(line)
    messages = normalize_messages(sample)
    record_id = _sample_id(sample, sample_id)
    parts, names, images = {}, {}, []
    for ref in image_refs(messages):
        if ref in names:
            continue
        data = _read_image(ref, base, allow_outside_paths)
        try:
            kind, width, height = verify(data)
        except ImageError as err:
            raise SampleError(err.kind, f"{shown(ref)}: {err}") from None
        names[ref] = f"img{len(names)}.{EXTENSIONS.get(kind, 'img')}"
        parts[names[ref]] = data
        images.append({"name": names[ref], "width": width, "height": height, "source": ref})
    for message in messages:
        for part in message["content"]:
            if part["type"] == "image":
                part["image"] = names[part["image"]]
    record = {"id": record_id, "messages": messages, "images": images}
    return {"json": json.dumps(record, ensure_ascii=False).encode(), **parts}


def parse_line(line: bytes | str) -> Any:
    """The JSON value of one line; SampleError when it is not UTF-8 or not JSON."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise SampleError(NOT_UTF8, f"byte {err.start + 1} ({err.object[err.start]:#04x}) {err.reason}") from None
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise SampleError(INVALID_JSON, str(err)) from None
    except RecursionError:
        raise SampleError(INVALID_JSON, "nested too deeply") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise SampleError(INVALID_JSON, str(err)) from None


def _sample_id(sample: dict, default: str) -> str:
    """The sample's own `id` (a string or an integer), or `default` when it has none (or null)."""
    value = sample.get("id")
    if value is None:
        return default
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise SampleError(BAD_FORMAT, f'"id" must be a string or an integer, got {brief(value)}')
    check_text(value, '"id"')
    return value


def _read_image(ref: str, base: Path, allow_outside: bool) -> bytes:
    """The bytes of the image file `ref` names; SampleError says why it cannot be read."""
    path = _image_path(ref, base, allow_outside)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC  # no waiting on a FIFO, no swapped-in link
    try:
        fd = os.open(path, flags)
    except (FileNotFoundError, NotADirectoryError):
        raise SampleError(MISSING, f"{shown(ref)} does not exist (paths are relative to the JSONL file)") from None
    except OSError as err:
        raise _os_error(ref, err) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SampleError(UNREADABLE, f"{shown(ref)} is not a regular file")
        if info.st_size > MAX_IMAGE_BYTES:
            raise SampleError(TOO_LARGE, f"{shown(ref)}: {info.st_size:,} bytes is more than {MAX_IMAGE_BYTES:,}")
        with os.fdopen(fd, "rb", closefd=False) as file:
            return file.read(MAX_IMAGE_BYTES + 1)
    except OSError as err:
        raise _os_error(ref, err) from None
    finally:
        os.close(fd)


def _image_path(ref: str, base: Path, allow_outside: bool) -> Path:
    """The image file `ref` names, symlinks resolved; SampleError when it is not a usable path."""
    if not ref:
        raise SampleError(BAD_PATH, "an image path is empty")
    if "\0" in ref:
        raise SampleError(BAD_PATH, f"{shown(ref)!r} holds a NUL character")
    relative = Path(ref)
    if relative.is_absolute() and not allow_outside:
        raise SampleError(
            OUTSIDE,
            f"{shown(ref)} is an absolute path; paths are relative to the JSONL file (--allow-outside-paths allows it)",
        )
    try:
        path = (base / relative).resolve()
    except RuntimeError:  # a symlink loop
        raise SampleError(UNREADABLE, f"{shown(ref)}: a symlink loop") from None
    except OSError as err:
        raise _os_error(ref, err) from None
    if not allow_outside and not path.is_relative_to(base):
        raise SampleError(
            OUTSIDE,
            f"{shown(ref)} leads outside the JSONL file's folder {base} (through '..' or a symlink); "
            "--allow-outside-paths allows it",
        )
    return path


def shown(ref: str) -> str:
    """An image path as messages show it: a long one cut in the middle."""
    return ref if len(ref) <= 120 else f"{ref[:60]}...{ref[-40:]} ({len(ref):,} characters)"


def _os_error(ref: str, err: OSError) -> SampleError:
    if err.errno == errno.ENAMETOOLONG:
        return SampleError(BAD_PATH, f"{shown(ref)}: {err.strerror}")
    return SampleError(UNREADABLE, f"{shown(ref)}: {err.strerror or err}")


def prepare(
    train: Path,
    output: Path,
    *,
    val: Path | None = None,
    val_fraction: float = 0.0,
    samples_per_shard: int = 1000,
    allow_outside_paths: bool = False,
    progress: bool = True,
) -> Summary:
    """Write the samples of `train` (and `val`, or a `val_fraction` of `train` chosen by a hash of each line) as an
    Energon dataset in `output`, which must be new or empty."""
    inputs = [train] + ([val] if val is not None else [])
    _check_arguments(inputs, val is not None, val_fraction, samples_per_shard)
    target = output_target(output)
    scratch = make_staging(target)
    try:
        summary = _write_dataset(
            scratch,
            [(train, None)] + ([(val, "val")] if val is not None else []),
            val_fraction=val_fraction,
            samples_per_shard=samples_per_shard,
            allow_outside_paths=allow_outside_paths,
            progress=progress,
        )
        publish(scratch, target, output)
    except OSError as err:
        raise UserError(f"cannot write the dataset next to {output}: {err}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return summary


def _check_arguments(inputs: list[Path], has_val: bool, val_fraction: float, samples_per_shard: int) -> None:
    for path in inputs:
        try:
            if not path.is_file():
                raise UserError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
            with path.open("rb") as file:
                head = file.read(2)
        except OSError as err:
            raise UserError(f"cannot read {path}: {err.strerror or err}") from None
        if head in UTF16_BOMS:
            raise UserError(f"{path} is UTF-16 text: save it as UTF-8 (one JSON object per line)")
    if has_val and val_fraction:
        raise UserError("give either a validation file or a validation fraction, not both")
    if not 0 <= val_fraction < 1:
        raise UserError(f"the validation fraction must be in [0, 1), got {val_fraction}")
    if samples_per_shard < 1:
        raise UserError("samples per shard must be at least 1")


def _write_dataset(
    root: Path,
    inputs: list[tuple[Path, str | None]],
    *,
    val_fraction: float,
    samples_per_shard: int,
    allow_outside_paths: bool,
    progress: bool,
) -> Summary:
    summary = Summary()
    writers = {split: ShardWriter(root, split, samples_per_shard, summary.shards) for split in SPLITS}
    total = sum(_count_lines(path) for path, _ in inputs) if progress else None
    try:
        with (
            (root / REPORT).open("w", encoding="ascii") as report,
            tqdm(total=total, unit=" samples", desc="prepare", disable=not progress) as bar,
        ):
            for path, forced_split in inputs:
                base = path.parent.resolve()
                for number, line, complete in _read_lines(path):
                    bar.update()
                    if not line.strip(b" \t\r\n"):
                        continue
                    try:
                        if not complete:
                            raise SampleError(LINE_TOO_LONG, f"more than {MAX_LINE_BYTES:,} bytes")
                        parts = read_sample(
                            line.rstrip(b"\r\n"), base, f"{path.name}:{number}", allow_outside_paths=allow_outside_paths
                        )
                    except SampleError as err:
                        summary.add_skip(_skip(path, number, line, err), report)
                        continue
                    split = forced_split or split_of(line, val_fraction)
                    writers[split].write(f"{sum(summary.samples.values()):09d}", parts)
                    summary.samples[split] += 1
                    summary.images += len(parts) - 1
    finally:
        for writer in writers.values():
            writer.close()
    if not summary.samples:
        raise UserError(summary.nothing_usable([path for path, _ in inputs]))
    if not summary.samples["train"]:
        fix = "a smaller --val-fraction" if val_fraction else f"usable samples in {inputs[0][0]}"
        raise UserError(
            f"the train split would be empty: all {plural(summary.samples['val'], 'usable sample')} went to the val "
            f"split; give more training samples or {fix}"
        )
    index_dataset(root, summary.shards)
    return summary


def _skip(path: Path, number: int, line: bytes, err: SampleError) -> Skip:
    start = line[: START_CHARS * 4].rstrip(b"\r\n").decode("utf-8", "backslashreplace")[:START_CHARS]
    return Skip(file=path, line=number, kind=err.kind, detail=err.detail, sample_id=_quick_id(line), start=start)


def _quick_id(line: bytes) -> str | None:
    """The `id` of a skipped line when it has a readable one."""
    with contextlib.suppress(SampleError):
        sample = parse_line(line)
        value = sample.get("id") if isinstance(sample, dict) else None
        if isinstance(value, str | int) and not isinstance(value, bool):
            return str(value)
    return None


def _read_lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, bytes, complete) of each line; a line over MAX_LINE_BYTES is cut there (complete false)."""
    try:
        with path.open("rb") as file:
            for number in itertools.count(1):
                line = file.readline(MAX_LINE_BYTES + 1)
                if not line:
                    return
                complete = len(line) <= MAX_LINE_BYTES or line.endswith(b"\n")
                if not complete:
                    while (rest := file.readline(2**20)) and not rest.endswith(b"\n"):
                        pass
                if number == 1 and line.startswith(UTF8_BOM):
                    line = line[len(UTF8_BOM) :]
                yield number, line, complete
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None


def _count_lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(1 for _ in f)
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None


def split_of(line: bytes, val_fraction: float) -> str:
    """A stable train/val choice from the line's content (the same line always lands in the same split)."""
    if line.endswith(b"\r\n"):
        line = line[:-2] + b"\n"
    return "val" if zlib.crc32(line) % 1_000_000 < val_fraction * 1_000_000 else "train"
