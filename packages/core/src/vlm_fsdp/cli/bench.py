"""`vlm-fsdp bench`: throughput of our trainer against transformers on one GPU."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlm_fsdp.bench.report import SETTINGS, SYSTEMS, VARIANTS
from vlm_fsdp.cli.common import add_config_arguments, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark the trainer against transformers and transformers + Liger on one GPU (table, chart, JSON)",
        description="Train the recipe (default: the qwen3_vl_30b_a3b_proxy) with vlm-fsdp (with fp32 main weights, "
        "and with Adam on the bf16 weights), with transformers' "
        "Qwen3VLMoeForConditionalGeneration built from the same config, and with that model patched by Liger's "
        "kernels (the `bench` extra), on the same bundled photos packed into sequences and on the text-only data, "
        "bf16, AdamW, at eight microbatches per optimizer step and at one. Prints useful tokens/s, TFLOP/s and MFU "
        "from one FLOP formula, peak memory and a step-time breakdown (data wait, vision forward, optimizer, and "
        "the rest: the language model's forward and both backward passes) after warm-up steps, and writes "
        "bench.json and bench.png.",
    )
    add_config_arguments(parser)
    parser.set_defaults(recipe="qwen3_vl_30b_a3b_proxy")
    parser.add_argument("--warmup", type=int, default=3, help="steps run before measuring (default: 3)")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per system (default: 10)")
    parser.add_argument(
        "--systems",
        nargs="+",
        choices=SYSTEMS,
        default=list(SYSTEMS),
        help="what to run (default: all four; vlm-fsdp-bf16-adam is vlm-fsdp with ddp.preserve_fp32_weights=false, "
        "Adam on the bf16 weights as the baselines do)",
    )
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=tuple(SETTINGS),
        default=list(SETTINGS),
        help="microbatches per optimizer step (default: both; each microbatch is the recipe's, 4,096 tokens on the "
        "proxy)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=tuple(VARIANTS),
        default=list(VARIANTS),
        help="which data (default: both): the bundled photos packed with their text, or the text-only data",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="where bench.json and bench.png go")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the measured steps, profile one more step of each system and write its tables of the costliest "
        "GPU kernels and host operations to OUT/profile_SYSTEM_VARIANT_Nmb.txt (N microbatches per step)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlm_fsdp.cli.train import cuda_devices
    from vlm_fsdp.errors import UserError
    from vlm_fsdp.known_warnings import silence

    config = config_from_args(args)
    if cuda_devices() == 0:
        raise UserError("bench measures GPU throughput and needs a CUDA GPU; none is visible here")
    if "transformers+liger" in args.systems:
        from vlm_fsdp.bench.hf_baseline import require_liger

        require_liger()  # before the other systems run, not after them
    silence()
    import torch
    from vlm_fsdp.bench.report import render, write, write_record
    from vlm_fsdp.bench.run import run_bench
    from vlm_fsdp.provenance import provenance

    meta = {
        "recipe": config.recipe,
        "device": torch.cuda.get_device_name(),
        "warmup": args.warmup,
        "steps": args.steps,
        "micro_batch_size": config.train.micro_batch_size,
        "seq_length": config.model.seq_length,
        "provenance": provenance(),
    }
    total = len(args.settings) * len(args.variants) * len(args.systems)
    steps = {"done": 0, "runs": 0}

    def on_step() -> None:
        steps["done"] += 1
        print(f"  run {steps['runs'] + 1}/{total}: step {steps['done']}/{args.warmup + args.steps}", flush=True)

    def progress(results: dict) -> None:
        steps.update(done=0, runs=steps["runs"] + 1)
        runs = [(s, v, name, f) for s, variants in results.items() for v, systems in variants.items()
                for name, f in systems.items()]  # fmt: skip
        setting, variant, system, figures = runs[-1]
        outcome = f"{figures['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in figures else figures["error"]
        record = write_record(results, meta, args.out)
        print(f"[{len(runs)}/{total}] {setting}, {variant}, {system}: {outcome} (so far in {record})", flush=True)

    results = run_bench(
        config,
        warmup=args.warmup,
        steps=args.steps,
        systems=tuple(args.systems),
        settings=tuple(args.settings),
        variants=tuple(args.variants),
        profile_dir=args.out if args.profile else None,
        progress=progress,
        on_step=on_step,
    )
    print(render(results))
    record, chart = write(results, meta, args.out)
    print(f"wrote {record} and {chart}")
    return 0
