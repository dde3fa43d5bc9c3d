"""Stand-ins for the bench's systems, run by `vlm_fsdp.bench.run.run_isolated` in a spawned process (so they live
in a module the child can import)."""

from __future__ import annotations

import time

import torch


def steps_then_figures(steps: int, *, tick) -> dict:
    for _ in range(steps):
        tick()
    return {"tokens_per_s": float(steps)}


def out_of_memory(*, tick) -> dict:
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.27 GiB\nmore detail")


def never_finishes_a_step(*, tick) -> dict:
    time.sleep(600)
    return {}
