"""`vlm-fsdp plan`: parameters, FLOPs, per-GPU memory and layout checks of a run, on the CPU."""

from __future__ import annotations

import argparse
import json

from vlm_fsdp.cli.common import (
    add_config_arguments,
    add_gpu_memory_argument,
    check_gpu_memory,
    check_gpus,
    config_from_args,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="count parameters, FLOPs and per-GPU memory of a run and check its layout (CPU only)",
        description="Count total and active parameters (vision / language dense / experts / embeddings), "
        "training FLOPs per text token and per vision patch, and per-GPU memory for weights, gradients, "
        "optimizer state, FSDP buffers and activations under the config's sharding strategy, expert "
        "parallelism and recompute; check the layout against the number of GPUs and say whether it fits, and "
        "whether the reason is memory or the layout. When memory does not fit, suggest the smallest number of GPUs "
        "(a power of two times the expert-parallel size) on which it does. Exits 1 when the layout is invalid or "
        "does not fit.",
    )
    add_config_arguments(parser)
    parser.add_argument("--gpus", type=int, default=1, help="number of GPUs of the run (default: 1)")
    add_gpu_memory_argument(parser)
    parser.add_argument(
        "--image-share",
        type=float,
        default=None,
        metavar="FRACTION",
        help="share of sequence tokens that are image tokens, for the activation estimate "
        "(default: 0.5, or 0 with data.text_only=true)",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlm_fsdp.errors import UserError
    from vlm_fsdp.plan.report import default_image_share, make_plan, render_plan

    check_gpus("--gpus", args.gpus)
    check_gpu_memory(args.gpu_memory)
    config = config_from_args(args)
    share = args.image_share if args.image_share is not None else default_image_share(config)
    if not 0 <= share <= 1:
        raise UserError("--image-share must be between 0 and 1")
    plan = make_plan(config, gpus=args.gpus, gpu_memory_gib=args.gpu_memory, image_share=share)
    print(json.dumps(plan, indent=2) if args.json else render_plan(plan))
    return 0 if plan["fits"] else 1
