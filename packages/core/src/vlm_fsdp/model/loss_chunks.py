"""How many labelled tokens the loss (`linear_loss`) takes at a time; free of torch, so that `plan` can read it."""

from __future__ import annotations

# bytes of fp32 logits per chunk: 1 GiB at Qwen3's 151,936-token vocabulary is 1,766 tokens
CHUNK_BYTES = 2**30


def chunk_rows(vocab: int) -> int:
    """Labelled tokens per chunk of the loss at this vocabulary size."""
    return max(1, CHUNK_BYTES // (4 * vocab))
