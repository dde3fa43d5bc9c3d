"""Arguments shared by the subcommands that build a run's config."""

from __future__ import annotations

import argparse
import math

from vlm_fsdp.config.fields import shorten
from vlm_fsdp.config.load import load_config
from vlm_fsdp.config.model import MAX_GPUS
from vlm_fsdp.config.recipes import DEFAULT_RECIPE
from vlm_fsdp.config.run import Config
from vlm_fsdp.errors import UserError

# The largest --gpu-memory taken, in GiB: far above any accelerator.
MAX_GPU_MEMORY_GIB = 100_000.0

OVERRIDES_HELP = (
    "dotted config overrides applied last, e.g. model.seq_length=8192 train.train_iters=20 "
    "ddp.data_parallel_sharding_strategy=optim_grads (values are read as YAML: true, null, [8, 16]). "
    "Precedence: recipe < --config-file < overrides. `vlm-fsdp recipes` lists recipes; the user guide's "
    "config reference lists every key."
)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--recipe",
        default=DEFAULT_RECIPE,
        help=f"recipe to start from (default: {DEFAULT_RECIPE}; `vlm-fsdp recipes` lists them)",
    )
    parser.add_argument(
        "--config-file",
        metavar="YAML",
        help="YAML file of overrides by section (model:, train:, ddp:, ...), e.g. recipes/*.yaml",
    )
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help=OVERRIDES_HELP)


def config_from_args(args: argparse.Namespace, world_size: int | None = None) -> Config:
    return load_config(args.recipe, config_file=args.config_file, overrides=args.overrides, world_size=world_size)


def add_gpu_memory_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gpu-memory",
        type=float,
        default=80.0,
        metavar="GiB",
        help="memory of one GPU in GiB (default: 80, an H100; 180 for B200 and GB200)",
    )


def check_gpus(option: str, count: int, low: int = 1, high: int = MAX_GPUS) -> None:
    """UserError unless `low <= count <= high` (a count of nodes or GPUs from the command line)."""
    if not low <= count <= high:
        raise UserError(f"{option} must be between {low:,} and {high:,}, got {shorten(count)}")


def check_gpu_memory(gib: float) -> None:
    if not (math.isfinite(gib) and 0 < gib <= MAX_GPU_MEMORY_GIB):
        raise UserError(f"--gpu-memory must be a positive number of GiB up to {MAX_GPU_MEMORY_GIB:,.0f}, got {gib}")
