"""Where checkpoints live, which one is the latest complete one, and how one is written safely.

    <save>/iter_0000100/      a complete checkpoint: DCP files (.metadata, *.distcp), run.yaml, checksums.sha256
    <save>/iter_0000200.partial/   being written (holds the writer's lock file); never loaded
    <save>/latest             name of the newest complete checkpoint, replaced atomically after it is complete

A checkpoint is written under `.partial` while its writer holds the lock file inside it (`writing`), checksummed and
renamed when every rank has finished (`finalize`), and only then named in `latest`, so an interrupted save never
replaces a good checkpoint and two writers never mix their files. Only what these functions created is deleted:
complete `iter_*` checkpoints when pruning, and `.partial` directories that hold our lock file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vlm_fsdp.checkpoint.checksums import CHECKSUMS, LOCK_FILE, write_checksums
from vlm_fsdp.errors import UserError

PARTIAL = ".partial"
METADATA = ".metadata"
RUN_RECORD = "run.yaml"
LATEST = "latest"
_ITER = re.compile(r"^iter_(\d{7,})$")
_ITER_PARTIAL = re.compile(r"^iter_\d{7,}\.partial$")
# errors of file systems that do not implement flock (then the recorded pid and host decide)
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def iteration_dir(save: Path, step: int) -> Path:
    return save / f"iter_{step:07d}"


def partial_dir(final: Path) -> Path:
    return final.with_name(final.name + PARTIAL)


def is_complete(path: Path) -> bool:
    return path.is_dir() and not path.name.endswith(PARTIAL) and (path / METADATA).is_file()


def check_new_output(out: Path) -> None:
    """Refuse an output path that holds something already (a file, or a directory that is not empty)."""
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"cannot create {out}: {parent} is a file, not a directory")
    if out.is_symlink():
        raise UserError(f"{out} is a symbolic link; --out must name a new directory")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; --out must name a new directory")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose a new output directory")


# --- the writer's lock ----------------------------------------------------------------------------------------


def _holder(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    return f"process {holder.get('pid', '?')} on host {holder.get('host', '?')} (since {holder.get('started', '?')})"


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return True  # unknown: assume it still runs
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _try_flock(fd: int, lock: Path, *, fresh: bool = False) -> bool:
    """Take the lock on `fd`: True if taken, False if another open file holds it. Where the file system has no
    flock, a lock file we have just created counts as taken, and an older one when its recorded holder is a dead
    process of this host."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno not in _NO_FLOCK:
            raise
        holder = _holder(lock)
        return fresh or (holder.get("host") == socket.gethostname() and not _pid_alive(holder.get("pid")))


def _record_holder(fd: int) -> None:
    holder = {
        "tool": "vlm-fsdp",
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join(sys.argv)[:1000],
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)


def _busy(final: Path, lock: Path) -> UserError:
    return UserError(
        f"{final} is being written by {_describe(_holder(lock))}: wait for it to finish, or stop it. If that "
        f"process is gone and the lock still blocks (a crash on a file system without locks), delete "
        f"{lock.parent} and retry"
    )


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _clear(directory: Path) -> None:
    """Empty our own interrupted output, keeping the lock file."""
    for entry in directory.iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _acquire(final: Path, partial: Path) -> int:
    """Create `partial` (or take over our own interrupted one) and lock it; returns the locked descriptor."""
    lock = partial / LOCK_FILE
    for attempt in range(50):
        try:
            partial.mkdir(parents=True)
        except FileExistsError:
            pass
        except OSError as err:
            raise UserError(f"cannot create {partial}: {err.strerror}") from None
        else:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            if not _try_flock(fd, lock, fresh=True):
                os.close(fd)
                raise _busy(final, lock)
            _record_holder(fd)
            return fd
        if partial.is_symlink() or not partial.is_dir():
            raise UserError(f"{partial} exists and is not a directory written by vlm-fsdp: move it away and retry")
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            if attempt >= 10 or any(partial.iterdir()):
                raise UserError(
                    f"{partial} exists and was not created by vlm-fsdp (it has no {LOCK_FILE}): move it away or "
                    "delete it yourself, then retry"
                ) from None
            time.sleep(0.1)  # another writer may have just created it and be about to lock it
            continue
        if not _try_flock(fd, lock):
            os.close(fd)
            raise _busy(final, lock)
        if not _same_file(fd, lock):  # the holder finished and renamed the directory meanwhile: start over
            os.close(fd)
            continue
        _clear(partial)  # the leftover of an interrupted write of ours
        _record_holder(fd)
        return fd
    raise UserError(f"{partial} keeps changing while vlm-fsdp tries to lock it: is another writer starting?")


@contextmanager
def writing(final: Path, *, remove_on_error: bool = True) -> Iterator[Path]:
    """Hold the lock of `final`'s `.partial` directory while the caller writes into it; yields that directory,
    empty but for the lock file. A second writer of `final` is refused with a message naming this process; the
    lock of a dead writer is released by the kernel, and its leftover directory is then taken over. The caller
    ends a successful write with `finalize(partial, final)` inside the block; when the block raises (Ctrl-C
    included) the `.partial` directory is deleted, or with `remove_on_error=False` kept, still marked as ours."""
    partial = partial_dir(final)
    fd = _acquire(final, partial)
    try:
        yield partial
    except BaseException:
        if remove_on_error and _same_file(fd, partial / LOCK_FILE):
            shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        os.close(fd)


def _ours_and_abandoned(partial: Path) -> bool:
    """A `.partial` directory holding our lock file that no live writer holds."""
    if partial.is_symlink() or not partial.is_dir():
        return False
    try:
        fd = os.open(partial / LOCK_FILE, os.O_RDWR)
    except OSError:
        return False
    try:
        return _try_flock(fd, partial / LOCK_FILE)
    finally:
        os.close(fd)  # releases the lock again


# --- making a checkpoint visible ------------------------------------------------------------------------------


def _make_room(final: Path, *, replace: bool) -> Path | None:
    """Prepare to rename onto `final`; returns where an older checkpoint of ours was moved, to delete afterwards."""
    if not final.exists() and not final.is_symlink():
        return None
    if final.is_dir() and not final.is_symlink() and not any(final.iterdir()):
        return None  # the rename replaces an empty directory
    if replace and is_complete(final) and not final.is_symlink() and (final / CHECKSUMS).is_file():
        aside = final.with_name(f"{final.name}.replaced-{os.getpid()}")
        final.rename(aside)
        return aside
    if not replace:
        raise UserError(f"{final} appeared while it was being written (another process?): it was left untouched; "
                        "choose a new output directory")  # fmt: skip
    raise UserError(f"{final} already exists and is not a checkpoint that vlm-fsdp finalised: it was left "
                    "untouched; move it away and save again")  # fmt: skip


def _point_latest(final: Path) -> None:
    tmp = final.parent / f"{LATEST}.tmp.{os.getpid()}"
    tmp.write_text(final.name + "\n")
    os.replace(tmp, final.parent / LATEST)


def finalize(
    partial: Path, final: Path, *, point_latest: bool = True, replace: bool = True, checksums: bool = True
) -> None:
    """Make a fully written checkpoint visible (main rank only): write its checksums, rename it, then point
    `latest` at it. An existing `final` is replaced only when it is a checkpoint of ours (it has checksums) and
    `replace` is set, or when it is an empty directory; anything else there is refused and left untouched."""
    if checksums:
        write_checksums(partial)
    aside = _make_room(final, replace=replace)
    partial.rename(final)
    (final / LOCK_FILE).unlink(missing_ok=True)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    if point_latest:
        _point_latest(final)


# --- finding and pruning checkpoints --------------------------------------------------------------------------


def _step(path: Path) -> int:
    match = _ITER.match(path.name)
    assert match, path
    return int(match.group(1))


def complete_checkpoints(save: Path) -> list[Path]:
    """Complete checkpoints under `save`, oldest first."""
    if not save.is_dir():
        return []
    found = [p for p in save.glob("iter_*") if _ITER.match(p.name) and is_complete(p)]
    return sorted(found, key=_step)


def _named_latest(save: Path) -> Path | None:
    """The checkpoint `latest` names, when it names one of `save`'s directories."""
    pointer = save / LATEST
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_bytes()[:4096].decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        return None
    return save / name


def latest_checkpoint(save: Path) -> Path | None:
    """The checkpoint `latest` names if it is complete, else the newest complete one, else None."""
    named = _named_latest(save)
    if named is not None and is_complete(named):
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
    """Delete all but the `keep` newest complete checkpoints (never the one `latest` names), and the leftovers of
    our own interrupted saves: `iter_*.partial` directories with our lock file that no live writer holds."""
    latest = _named_latest(save)
    for old in complete_checkpoints(save)[:-keep] if keep > 0 else []:
        if old != latest and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
    for leftover in save.glob(f"iter_*{PARTIAL}") if save.is_dir() else ():
        if _ITER_PARTIAL.match(leftover.name) and _ours_and_abandoned(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
