"""What the ranks of a run do together around a checkpoint's files: hold the save directory's lock (on the main
rank, with every rank told when another writer holds it), hash the files each rank wrote (so that writing the
checksums takes one rank's share of the data, not all of it), and verify a checkpoint before loading it, each
rank hashing a share of its files. Every rank ends with the same outcome or the same error, so none waits forever
in a collective that another rank has left.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from vlm_fsdp.checkpoint.checksums import checksum_problems, hash_files, listed_files
from vlm_fsdp.checkpoint.layout import partial_dir, writing
from vlm_fsdp.errors import UserError


def agree(error: str | None) -> None:
    """Raise `error` (a rank's message, or None) on every rank if any rank had one."""
    errors = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(errors, error)
    found = next((e for e in errors if e), None)
    if found:
        raise UserError(found)


@contextmanager
def locked_partial(final: Path) -> Iterator[Path]:
    """The `.partial` directory of checkpoint `final`, locked by the main rank while every rank writes into it
    (`vlm_fsdp.checkpoint.layout.writing`); a save that fails keeps it, marked as ours, for `prune` to remove."""
    with ExitStack() as stack:
        error = None
        if torch.distributed.get_rank() == 0:
            try:
                stack.enter_context(writing(final, remove_on_error=False))
            except UserError as err:
                error = str(err)
        agree(error)
        yield partial_dir(final)


def own_file_digests(partial: Path, rank: int) -> dict[str, str] | None:
    """The main rank's view of the digests of every file the ranks wrote into `partial` (DCP names them
    `__<rank>_<n>.distcp`): each rank hashes its own; None on the other ranks."""
    mine = hash_files(sorted(partial.glob(f"__{rank}_*")), progress=rank == 0)
    gathered = [None] * torch.distributed.get_world_size() if rank == 0 else None
    torch.distributed.gather_object(mine, gathered, dst=0)
    return {name: digest for digests in gathered for name, digest in digests.items()} if rank == 0 else None


def verify(path: Path) -> bool:
    """Check a checkpoint's files against its checksums, each rank hashing a share of them: True when they match,
    False when the checkpoint has none (written by an older vlm-fsdp); a UserError on every rank otherwise."""
    listed = listed_files(path)
    if listed is None:
        return False
    rank, ranks = torch.distributed.get_rank(), torch.distributed.get_world_size()
    error = None
    try:
        problems = checksum_problems(path, names=set(listed[rank::ranks]), progress=rank == 0) or []
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            error = f"checkpoint {path} is damaged: {shown} (`vlm-fsdp inspect {path}` lists it all)"
    except UserError as err:
        error = str(err)
    agree(error)
    return True
