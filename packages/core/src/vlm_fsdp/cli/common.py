"""Arguments shared by the subcommands that build a run's config."""

from __future__ import annotations

import argparse

from vlm_fsdp.config.load import load_config
from vlm_fsdp.config.recipes import DEFAULT_RECIPE
from vlm_fsdp.config.run import Config

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
