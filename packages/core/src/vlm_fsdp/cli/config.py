"""`vlm-fsdp config`: print the resolved, validated config of a run as YAML."""

from __future__ import annotations

import argparse

from vlm_fsdp.cli.common import add_config_arguments, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "config",
        help="print the resolved config of a recipe with its overrides",
        description="Resolve recipe < --config-file < overrides, fill the Megatron-FSDP defaults, validate, "
        "and print the result as YAML (the same file `train` saves as config.yaml in its output directory).",
    )
    add_config_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlm_fsdp.config.load import to_yaml

    print(to_yaml(config_from_args(args)), end="")
    return 0
