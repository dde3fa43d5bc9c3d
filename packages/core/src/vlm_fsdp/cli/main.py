"""Entry point of the `vlm-fsdp` console script.

Each subcommand lives in a module with `register(subparsers)`; the core's own are listed in BUILTIN, and other
packages add theirs through the `vlm_fsdp.cli` entry-point group (`convert = "vlm_fsdp.convert.cli:register"`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import entry_points

from vlm_fsdp.errors import UserError

BUILTIN = ("train", "plan", "config", "recipes", "data", "slurm", "bench")
GROUP = "vlm_fsdp.cli"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-fsdp",
        description="Train Qwen3-VL mixture-of-experts vision-language models with Megatron-Core and "
        "Megatron-FSDP, from one GPU to a Slurm cluster.",
        epilog="Run `vlm-fsdp COMMAND --help` for a command's options.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in BUILTIN:
        importlib.import_module(f"vlm_fsdp.cli.{name}").register(subparsers)
    for ep in sorted(entry_points(group=GROUP), key=lambda ep: ep.name):
        ep.load()(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except UserError as err:
        print(f"vlm-fsdp {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vlm-fsdp {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
