"""How many labelled tokens the loss (`linear_loss`) takes at a time; free of torch, so that `plan` can read it."""

from __future__ import annotations

# bytes of fp32 logits per chunk: 256 MiB at Qwen3's 151,936-token vocabulary is 441 tokens, whose products with
# the output weight (2048 wide in 30B-A3B) still fill the GPU
CHUNK_BYTES = 2**28


def chunk_rows(vocab: int) -> int:
    """Labelled tokens per chunk of the loss at this vocabulary size."""
    return max(1, CHUNK_BYTES // (4 * vocab))
