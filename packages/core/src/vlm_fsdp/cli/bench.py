"""`vlm-fsdp bench`: throughput of our trainer against transformers on one GPU."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlm_fsdp.cli.common import add_config_arguments, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark the trainer against transformers on one GPU (table, PNG chart, JSON)",
        description="Train the recipe (default: the qwen3_vl_30b_a3b_proxy) with vlm-fsdp and with transformers' "
        "Qwen3VLMoeForConditionalGeneration built from the same config, on the same bundled photos packed into "
        "sequences and on the text-only data, bf16, AdamW. Prints useful tokens/s, TFLOP/s and MFU from one FLOP "
        "formula, peak memory and a step-time breakdown (data wait, vision forward, optimizer, and the rest: the "
        "language model's forward and both backward passes) after warm-up steps, and writes bench.json and "
        "bench.png.",
    )
    add_config_arguments(parser)
    parser.set_defaults(recipe="qwen3_vl_30b_a3b_proxy")
    parser.add_argument("--warmup", type=int, default=3, help="steps run before measuring (default: 3)")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per system (default: 10)")
    parser.add_argument(
        "--systems",
        nargs="+",
        choices=("vlm-fsdp", "transformers"),
        default=["vlm-fsdp", "transformers"],
        help="what to run (default: both)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="where bench.json and bench.png go")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the measured steps, profile one more step of each system and write its tables of the costliest "
        "GPU kernels and host operations to OUT/profile_SYSTEM_VARIANT.txt",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlm_fsdp.cli.train import cuda_devices
    from vlm_fsdp.errors import UserError
    from vlm_fsdp.known_warnings import silence

    config = config_from_args(args)
    if cuda_devices() == 0:
        raise UserError("bench measures GPU throughput and needs a CUDA GPU; none is visible here")
    silence()
    import torch
    from vlm_fsdp.bench.report import render, write
    from vlm_fsdp.bench.run import run_bench
    from vlm_fsdp.provenance import provenance

    results = run_bench(
        config,
        warmup=args.warmup,
        steps=args.steps,
        systems=tuple(args.systems),
        profile_dir=args.out if args.profile else None,
    )
    print(render(results))
    meta = {
        "recipe": config.recipe,
        "device": torch.cuda.get_device_name(),
        "warmup": args.warmup,
        "steps": args.steps,
        "provenance": provenance(),
    }
    record, chart = write(results, meta, args.out)
    print(f"wrote {record} and {chart}")
    return 0
