"""`vlm-fsdp train`: train a recipe on the GPUs of this machine (or of a Slurm allocation)."""

from __future__ import annotations

import argparse

from vlm_fsdp.cli.common import add_config_arguments, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a recipe (needs a CUDA GPU)",
        description="Train a Qwen3-VL MoE model with Megatron-Core and Megatron-FSDP. With no arguments, trains "
        "the tiny recipe on the bundled image-text data on one GPU. The resolved config and the run's "
        "provenance are printed and saved as config.yaml in train.output_dir. Without a CUDA GPU it stops at "
        "once; use `vlm-fsdp plan` to check a run on the CPU.",
    )
    add_config_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlm_fsdp.errors import UserError

    config_from_args(args)  # report config mistakes before anything else
    import torch

    if not torch.cuda.is_available():
        raise UserError(
            "training needs a CUDA GPU and none is visible here. To check a run's parameters, FLOPs, memory "
            f"and layout on this machine, use: vlm-fsdp plan --recipe {args.recipe}"
            + "".join(f" {o}" for o in args.overrides)
        )
    raise UserError("the training loop is not part of this build yet")
