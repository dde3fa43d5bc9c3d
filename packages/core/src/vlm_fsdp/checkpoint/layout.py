"""Where checkpoints live and which one is the latest complete one.

    <save>/iter_0000100/      a complete checkpoint: DCP files (.metadata, *.distcp) and run.yaml
    <save>/iter_0000200.partial/   being written; never loaded
    <save>/latest             name of the newest complete checkpoint, replaced atomically after it is complete

A checkpoint is written under `.partial`, renamed when every rank has finished, and only then named in `latest`,
so an interrupted save never replaces a good checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from vlm_fsdp.errors import UserError

PARTIAL = ".partial"
METADATA = ".metadata"
RUN_RECORD = "run.yaml"
_ITER = re.compile(r"^iter_(\d{7,})$")


def iteration_dir(save: Path, step: int) -> Path:
    return save / f"iter_{step:07d}"


def is_complete(path: Path) -> bool:
    return path.is_dir() and not path.name.endswith(PARTIAL) and (path / METADATA).is_file()


def finalize(partial: Path, final: Path, *, point_latest: bool = True) -> None:
    """Make a fully written checkpoint visible: rename it, then point `latest` at it (main rank only)."""
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    if not point_latest:
        return
    tmp = final.parent / "latest.tmp"
    tmp.write_text(final.name + "\n")
    os.replace(tmp, final.parent / "latest")


def complete_checkpoints(save: Path) -> list[Path]:
    """Complete checkpoints under `save`, oldest first."""
    found = [p for p in save.glob("iter_*") if _ITER.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: int(_ITER.match(p.name).group(1)))


def latest_checkpoint(save: Path) -> Path | None:
    """The checkpoint `latest` names if it is complete, else the newest complete one, else None."""
    pointer = save / "latest"
    if pointer.is_file():
        named = save / pointer.read_text().strip()
        if is_complete(named):
            return named
    found = complete_checkpoints(save)
    return found[-1] if found else None


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or the latest complete one under a save directory."""
    if is_complete(path):
        return path
    latest = latest_checkpoint(path) if path.is_dir() else None
    if latest is None:
        raise UserError(
            f"no complete checkpoint at {path} (a directory with {METADATA}, or a save directory "
            "holding iter_* checkpoints)"
        )
    return latest


def prune(save: Path, keep: int) -> None:
    """Delete all but the `keep` newest complete checkpoints, and leftovers of interrupted saves."""
    for old in complete_checkpoints(save)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
