"""Per-file SHA-256 checksums of a checkpoint directory, written when it is finalised and verified before it is used.

The checksum file is in `sha256sum` format, so `cd CKPT && sha256sum -c checksums.sha256` checks it too. It covers
every file of the directory except itself and the writer's lock file; files are hashed with streaming reads, a few
files at a time.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm
from vlm_fsdp.errors import UserError

CHECKSUMS = "checksums.sha256"
LOCK_FILE = ".vlm-fsdp-lock"
"""The lock a writer holds inside the `.partial` directory it writes (see `layout.writing`): never checkpoint data."""
NOT_CHECKED = frozenset({CHECKSUMS, LOCK_FILE})
CHUNK_BYTES = 8 * 1024**2
THREADS = 4
PROGRESS_FROM_BYTES = 1024**3
_LINE = re.compile(r"^([0-9a-f]{64})  ([^/\\\0\r]+)$")


def _content_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name not in NOT_CHECKED)


def _hash_file(path: Path, stop: threading.Event, bar: tqdm) -> str | None:
    """The file's digest, or None when `stop` was set before it was read to the end."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as file:
        while not stop.is_set():
            count = file.readinto(buffer)
            if not count:
                return digest.hexdigest()
            digest.update(view[:count])
            bar.update(count)
    return None


def hash_files(files: Iterable[Path], *, progress: bool = True, what: str = "checksum") -> dict[str, str]:
    """File name -> SHA-256 hex digest, a few files at a time; a progress bar for large totals."""
    files = list(files)
    try:
        total = sum(f.stat().st_size for f in files)
    except OSError as err:
        raise UserError(f"cannot read {err.filename}: {err.strerror}") from None
    stop = threading.Event()
    with (
        tqdm(
            total=total, desc=what, unit="B", unit_scale=True, disable=not progress or total < PROGRESS_FROM_BYTES
        ) as bar,
        ThreadPoolExecutor(max_workers=max(1, min(THREADS, len(files)))) as pool,
    ):
        futures = {f.name: pool.submit(_hash_file, f, stop, bar) for f in files}
        try:
            return {name: future.result() for name, future in futures.items()}
        except OSError as err:
            stop.set()
            raise UserError(f"cannot read {err.filename}: {err.strerror}") from None
        except BaseException:
            stop.set()  # let the workers stop after their current chunk, also on Ctrl-C
            pool.shutdown(cancel_futures=True)
            raise


def write_checksums(directory: Path, *, known: dict[str, str] | None = None, progress: bool = True) -> None:
    """Write the checksum file of every file in `directory` (atomically: a reader sees all of it or none);
    `known`: digests already computed (by the ranks that wrote those files), which are not hashed again."""
    known = known or {}
    for path in _content_files(directory):
        if not path.is_file() or path.is_symlink():
            raise UserError(f"{path} is not a regular file: a checkpoint directory holds files only")
    digests = hash_files([p for p in _content_files(directory) if p.name not in known], progress=progress)
    digests |= {name: digest for name, digest in known.items() if (directory / name).is_file()}
    tmp = directory / f"{CHECKSUMS}.tmp"
    tmp.write_text(_format(digests))
    tmp.replace(directory / CHECKSUMS)


def _format(digests: dict[str, str]) -> str:
    return "".join(f"{digest}  {name}\n" for name, digest in sorted(digests.items()))


def _read_checksums(path: Path) -> tuple[dict[str, str], list[str]]:
    """Listed file name -> digest, and the problems of the file itself: it must be exactly what
    `write_checksums` writes, so that no damage to it goes unnoticed."""
    listed, problems = {}, []
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as err:
        return {}, [f"{CHECKSUMS} cannot be read: {err.strerror}"]
    lines = text.split("\n")
    for number, line in enumerate(lines[:-1], start=1):
        match = _LINE.match(line)
        if not match or match.group(2) in listed:
            problems.append(f"{CHECKSUMS} line {number} is malformed: {line[:80]!r}")
            continue
        listed[match.group(2)] = match.group(1)
    if not problems and text != _format(listed):
        problems.append(f"{CHECKSUMS} is damaged: it is not in the format vlm-fsdp writes")
    return listed, problems


def listed_files(directory: Path) -> list[str] | None:
    """The files the checksum file lists, sorted; None when there is none."""
    checksum_file = directory / CHECKSUMS
    return sorted(_read_checksums(checksum_file)[0]) if checksum_file.is_file() else None


def checksum_problems(directory: Path, *, names: set[str] | None = None, progress: bool = True) -> list[str] | None:
    """What does not match the checksum file: damaged, missing and unlisted files; None when there is no checksum
    file (checkpoints written before vlm-fsdp recorded them). `names`: hash only these of the listed files (the
    share of one of several processes that verify a checkpoint together)."""
    checksum_file = directory / CHECKSUMS
    if not checksum_file.is_file():
        return None
    listed, problems = _read_checksums(checksum_file)
    present = {p.name: p for p in _content_files(directory)}
    problems += [f"{name} is listed in {CHECKSUMS} but missing" for name in sorted(set(listed) - set(present))]
    problems += [
        f"{name} is not listed in {CHECKSUMS}: it was added after the checkpoint was written"
        for name in sorted(set(present) - set(listed))
    ]
    readable = [p for name, p in present.items() if name in listed and p.is_file() and (names is None or name in names)]
    problems += [f"{p.name} is not a regular file" for name, p in present.items() if name in listed and not p.is_file()]
    digests = hash_files(readable, progress=progress, what="verify")
    problems += [
        f"{name} does not match its checksum: it is damaged or was changed after the checkpoint was written"
        for name, digest in sorted(digests.items())
        if digest != listed[name]
    ]
    return problems


def verify_checksums(directory: Path, *, progress: bool = True) -> bool:
    """Check every file of a checkpoint against its checksum file: True when all match, False when the checkpoint
    has no checksum file (written by an older vlm-fsdp); raises UserError naming what is damaged."""
    problems = checksum_problems(directory, progress=progress)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise UserError(f"checkpoint {directory} is damaged: {shown} (`vlm-fsdp inspect {directory}` lists it all)")
    return problems is not None
