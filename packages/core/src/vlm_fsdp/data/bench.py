"""`data bench`: throughput of the whole loader (planning, reading, decoding, patchifying, packing, collating)."""

from __future__ import annotations

import time

from vlm_fsdp.config.run import Config
from vlm_fsdp.data.energon import SplitReader
from vlm_fsdp.data.loader import build_loader
from vlm_fsdp.data.settings import resolve
from vlm_fsdp.errors import UserError


def bench(config: Config, *, microbatches: int, warmup: int) -> dict:
    """Time `microbatches` microbatches of the train loader after `warmup` ones (which include worker start-up).

    The train split's shards are checked first, so a damaged dataset is reported (DatasetError) before timing."""
    started = time.perf_counter()
    SplitReader(resolve(config).dataset, "train").check()
    loader = build_loader(config)
    try:
        for _ in range(warmup):
            next(loader)
        ready = time.perf_counter()
        samples = images = tokens = patches = 0
        for _ in range(microbatches):
            batch = next(loader)
            samples += len(batch.doc_lengths)
            images += len(batch.image_patches)
            tokens += batch.num_tokens
            patches += sum(batch.image_patches)
    except UserError as err:
        message = worker_message(err)
        if message == str(err):
            raise
        raise UserError(message) from None
    finally:
        loader.close()
    seconds = time.perf_counter() - ready
    return {
        "workers": loader.settings.num_workers,
        "microbatches": microbatches,
        "startup_s": ready - started,
        "seconds": seconds,
        "samples_per_s": samples / seconds,
        "images_per_s": images / seconds,
        "tokens_per_s": tokens / seconds,
        "patches_per_s": patches / seconds,
        "packing_efficiency": loader.stats.packing_efficiency,
    }


def worker_message(err: UserError) -> str:
    """The message of an error as it was raised: PyTorch's DataLoader re-raises a worker's exception with the
    worker's traceback in its message."""
    message = str(err)
    if "Original Traceback" not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    name = f"{type(err).__name__}: "
    return last[last.index(name) + len(name) :] if name in last else last


def render(result: dict) -> str:
    return (
        f"{result['microbatches']} microbatches in {result['seconds']:.2f} s with {result['workers']} workers "
        f"(start-up and warm-up {result['startup_s']:.1f} s)\n"
        f"  samples/s {result['samples_per_s']:10.1f}\n"
        f"  images/s  {result['images_per_s']:10.1f}\n"
        f"  tokens/s  {result['tokens_per_s']:10.0f}\n"
        f"  patches/s {result['patches_per_s']:10.0f}\n"
        f"  packing efficiency {result['packing_efficiency']:.1%}"
    )
