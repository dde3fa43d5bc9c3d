"""Packing samples into fixed-length sequences: first-fit decreasing under a token and a patch budget."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, kw_only=True)
class Item:
    """A sample to pack: what it costs, and which sample it is."""

    index: int
    """Dataset index of the sample."""
    tokens: int
    patches: int


@dataclass(kw_only=True)
class Sequence:
    """One packed row: its samples in order, and their totals."""

    items: list[Item] = field(default_factory=list)
    tokens: int = 0
    patches: int = 0

    def add(self, item: Item) -> None:
        self.items.append(item)
        self.tokens += item.tokens
        self.patches += item.patches


def pack(items: list[Item], max_tokens: int, max_patches: int | None) -> list[Sequence]:
    """First-fit decreasing: the longest sample first, each into the first sequence with room for its tokens and
    patches. Every item must fit on its own (the caller skips those that do not)."""
    sequences: list[Sequence] = []
    for item in sorted(items, key=lambda it: it.tokens, reverse=True):
        for seq in sequences:
            if seq.tokens + item.tokens <= max_tokens and (
                max_patches is None or seq.patches + item.patches <= max_patches
            ):
                seq.add(item)
                break
        else:
            sequences.append(Sequence())
            sequences[-1].add(item)
    return sequences
