"""`vlm-fsdp recipes`: list the installed recipes."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "recipes",
        help="list the installed recipes",
        description="List every recipe registered under the `vlm_fsdp.recipes` entry-point group, one per line "
        "with its summary (the first paragraph of the recipe function's docstring). Pass one to train, plan or "
        "config with --recipe NAME.",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlm_fsdp.config.recipes import recipe_names, recipe_summary

    names = recipe_names()
    width = max(map(len, names), default=0)
    for name in names:
        print(f"{name:<{width}}  {recipe_summary(name)}")
    return 0
