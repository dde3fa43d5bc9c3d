"""Vision-aware balancing: spread one round of packed sequences over data-parallel ranks by patch count.

Every rank's vision tower waits for the slowest rank at the next FSDP collective, so the ranks' microbatches of a
round should carry similar numbers of patches; tokens are equal already (every row is model.seq_length long).
"""

from __future__ import annotations


def assign(patches: list[int], ranks: int, rows: int) -> list[list[int]]:
    """Indices of `patches` (one per sequence, at most ranks x rows of them) for each rank, `rows` at most each:
    the largest first, each to the rank with the fewest patches so far that still has a free row (longest
    processing time first), ties to the lower rank."""
    assert len(patches) <= ranks * rows
    out: list[list[int]] = [[] for _ in range(ranks)]
    load = [0] * ranks
    for i in sorted(range(len(patches)), key=lambda i: -patches[i]):
        rank = min((r for r in range(ranks) if len(out[r]) < rows), key=lambda r: (load[r], r))
        out[rank].append(i)
        load[rank] += patches[i]
    return out
