"""Where `data prepare` writes: a hidden directory beside the output, marked with this process's host and pid,
renamed into place only when the dataset is complete, so a failed or interrupted run never leaves something that
passes for a dataset or blocks a rerun. A later run removes such leftovers only when their marker names a process
of this host that has ended; anything else beside the output is never touched."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import socket
from pathlib import Path

from vlm_fsdp.errors import UserError

MARKER = ".vlm-fsdp-prepare"


def output_target(output: Path) -> Path:
    """The absolute directory the dataset is renamed to (a symlink's target); UserError unless new or empty."""
    try:
        target = output.absolute()
        if target.is_symlink():
            target = target.resolve()
        usable = not target.exists() or (target.is_dir() and not any(target.iterdir()))
    except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop
        raise UserError(
            f"cannot use {output} as the output directory: {getattr(err, 'strerror', None) or err}"
        ) from None
    if not usable:
        raise UserError(f"{output} exists and is not an empty directory: choose a new output directory")
    return target


def _prefix(target: Path) -> str:
    return f".{target.name[:64]}.prepare-"


def make_staging(target: Path) -> Path:
    """A new hidden directory beside `target` to write into, marked as ours; also removes the ones that runs on
    this machine left behind when they were killed."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(target)
        while True:
            scratch = target.parent / f"{_prefix(target)}{secrets.token_hex(4)}"
            with contextlib.suppress(FileExistsError):
                scratch.mkdir()
                break
        (scratch / MARKER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    except OSError as err:
        raise UserError(f"cannot create the dataset beside {target}: {err.strerror or err}") from None
    return scratch


def _remove_abandoned(target: Path) -> None:
    """Remove scratch directories of `target` whose marker names a process of this host that no longer runs."""
    for candidate in target.parent.glob(f"{glob.escape(_prefix(target))}*"):
        try:
            marker = json.loads((candidate / MARKER).read_text())
            mine = marker["host"] == socket.gethostname() and not _is_running(int(marker["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not one of ours, or not readable: leave it alone
        if mine and candidate.is_dir() and not candidate.is_symlink():
            shutil.rmtree(candidate, ignore_errors=True)


def _is_running(pid: int) -> bool:
    """Whether process `pid` runs (or might: a pid that cannot be checked counts as running)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True
    return True


def publish(scratch: Path, target: Path, output: Path) -> None:
    """Rename the finished dataset into place (replacing an empty directory there in the same step)."""
    (scratch / MARKER).unlink()
    try:
        os.replace(scratch, target)
    except OSError as err:
        raise UserError(
            f"cannot move the finished dataset to {output}: {err.strerror} (did it fill meanwhile?)"
        ) from None
