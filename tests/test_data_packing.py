"""First-fit-decreasing packing under token and patch budgets, and balancing sequences over ranks by patches."""

from __future__ import annotations

import numpy as np
import pytest
from vlm_fsdp.data.balance import assign
from vlm_fsdp.data.packing import Item, pack


def items(tokens: list[int], patches: list[int] | None = None) -> list[Item]:
    patches = patches or [0] * len(tokens)
    return [Item(index=i, tokens=t, patches=p) for i, (t, p) in enumerate(zip(tokens, patches, strict=True))]


def test_first_fit_decreasing_fills_sequences_and_keeps_every_sample_once():
    rng = np.random.default_rng(0)
    tokens = rng.integers(20, 900, size=300).tolist()
    sequences = pack(items(tokens), 1024, None)
    assert sorted(i.index for s in sequences for i in s.items) == list(range(300))
    assert all(s.tokens == sum(i.tokens for i in s.items) <= 1024 for s in sequences)
    lower_bound = -(-sum(tokens) // 1024)
    assert len(sequences) <= lower_bound * 11 // 9 + 1  # FFD's guarantee
    efficiency = sum(tokens) / (1024 * len(sequences))
    assert efficiency > 0.95


def test_exact_fit_and_order():
    sequences = pack(items([600, 400, 500, 524, 1024]), 1024, None)
    assert [[i.tokens for i in s.items] for s in sequences] == [[1024], [600, 400], [524, 500]]


def test_patch_budget_opens_new_sequences():
    sequences = pack(items([100] * 6, [1000] * 6), 4096, 2500)
    assert [len(s.items) for s in sequences] == [2, 2, 2]
    assert all(s.patches <= 2500 for s in sequences)


@pytest.mark.parametrize(("ranks", "rows"), [(2, 1), (4, 2), (8, 1), (3, 4)])
def test_balance_gives_every_rank_its_rows_with_similar_patches(ranks, rows):
    rng = np.random.default_rng(ranks * 10 + rows)
    for _ in range(20):
        patches = rng.integers(0, 20000, size=ranks * rows).tolist()
        out = assign(patches, ranks, rows)
        assert sorted(i for r in out for i in r) == list(range(ranks * rows))
        assert all(len(r) == rows for r in out)
        loads = [sum(patches[i] for i in r) for r in out]
        naive = [sum(patches[r * rows : (r + 1) * rows]) for r in range(ranks)]
        assert max(loads) - min(loads) <= max(patches)
        assert max(loads) <= max(naive)


def test_balance_with_fewer_sequences_than_rows_leaves_rows_free():
    out = assign([5, 9, 1], ranks=2, rows=2)
    assert out == [[1], [0, 2]]
    assert assign([], ranks=3, rows=1) == [[], [], []]
