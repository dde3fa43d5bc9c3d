"""The `convert` and `inspect` subcommands (registered through the `vlm_fsdp.cli` entry-point group)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlm_fsdp.cli.common import add_config_arguments


def register_convert(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert checkpoints between Hugging Face and fsdp_dtensor formats (CPU)",
        description="Convert model weights between a Hugging Face Qwen3-VL-MoE directory and an fsdp_dtensor "
        "checkpoint, on the CPU. Run `vlm-fsdp convert DIRECTION --help` for each direction.",
    )
    sub = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True, help="what to convert")

    to_fsdp = sub.add_parser(
        "hf-to-fsdp",
        help="Hugging Face safetensors -> fsdp_dtensor checkpoint",
        description="Stream a local Hugging Face Qwen3-VL-MoE directory (safetensors + config.json) into a "
        "model-only fsdp_dtensor checkpoint that training starts from with checkpoint.load=OUT. Peak memory is "
        "one tensor group (one layer's experts or q/k/v), not the model.",
    )
    to_fsdp.add_argument("--hf", required=True, type=Path, metavar="DIR", help="Hugging Face model directory")
    to_fsdp.add_argument("--out", required=True, type=Path, metavar="DIR", help="checkpoint directory to create")
    to_fsdp.add_argument(
        "--recipe",
        help="check the weights against this recipe's architecture (default: take the architecture from config.json)",
    )
    to_fsdp.set_defaults(func=hf_to_fsdp)

    to_hf = sub.add_parser(
        "fsdp-to-hf",
        help="fsdp_dtensor checkpoint -> Hugging Face safetensors",
        description="Write the model of an fsdp_dtensor checkpoint (written by any number of ranks; a save "
        "directory means its latest complete checkpoint) as safetensors shards with an index and config.json, "
        "plus the tokenizer and processor files the run used, for transformers' from_pretrained.",
    )
    to_hf.add_argument("--ckpt", required=True, type=Path, metavar="DIR", help="checkpoint or save directory")
    to_hf.add_argument("--out", required=True, type=Path, metavar="DIR", help="new Hugging Face directory")
    to_hf.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="dtype of the written tensors (default: bfloat16)",
    )
    to_hf.add_argument(
        "--no-verify",
        action="store_true",
        help="skip checking the checkpoint's files against their checksums first (one more read of the checkpoint)",
    )
    to_hf.set_defaults(func=fsdp_to_hf)

    from_dist = sub.add_parser(
        "torch-dist-to-fsdp",
        help="Megatron torch_dist checkpoint -> fsdp_dtensor checkpoint",
        description="Turn the language decoder of a Megatron torch_dist checkpoint (from a tensor/pipeline/expert "
        "parallel Megatron-Core run) into a model-only fsdp_dtensor checkpoint, reading one layer at a time. The "
        "vision tower is taken from a Hugging Face directory of the same model. The architecture is the recipe's "
        "with the config file and overrides applied.",
    )
    from_dist.add_argument("--ckpt", required=True, type=Path, metavar="DIR", help="torch_dist checkpoint directory")
    from_dist.add_argument(
        "--hf",
        required=True,
        type=Path,
        metavar="DIR",
        help="Hugging Face directory of the same model, for the vision tower",
    )
    from_dist.add_argument("--out", required=True, type=Path, metavar="DIR", help="checkpoint directory to create")
    add_config_arguments(from_dist)
    from_dist.set_defaults(func=torch_dist_to_fsdp)


def register_inspect(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="describe a checkpoint and check that it is complete",
        description="Print a checkpoint's format, step, every tensor (name, shape, dtype, how it is split), "
        "provenance and config, after checking its files against their checksums. An incomplete, damaged or "
        "inconsistent checkpoint is reported with what is wrong; the exit status is then 1.",
    )
    parser.add_argument("checkpoint", type=Path, metavar="CKPT", help="checkpoint directory or save directory")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="list the checkpoint without checking its files against their checksums (which reads all of it)",
    )
    parser.set_defaults(func=inspect)


def hf_to_fsdp(args: argparse.Namespace) -> int:
    from vlm_fsdp.checkpoint.hf_import import model_from_hf, read_hf_config, write_model_checkpoint
    from vlm_fsdp.checkpoint.layout import check_new_output
    from vlm_fsdp.config.load import load_config

    check_new_output(args.out)
    if args.recipe:
        read_hf_config(args.hf)
        model = load_config(args.recipe).model
    else:
        model = model_from_hf(args.hf)
    write_model_checkpoint(args.hf, args.out, model, point_latest=False)
    print(f"wrote {args.out} (start training from it with checkpoint.load={args.out})")
    return 0


def fsdp_to_hf(args: argparse.Namespace) -> int:
    import torch
    from vlm_fsdp.convert.fsdp_to_hf import export_hf

    out = export_hf(args.ckpt, args.out, dtype=getattr(torch, args.dtype), verify=not args.no_verify)
    print(f"wrote {out} (load it with transformers' Qwen3VLMoeForConditionalGeneration.from_pretrained)")
    return 0


def torch_dist_to_fsdp(args: argparse.Namespace) -> int:
    from vlm_fsdp.cli.common import config_from_args
    from vlm_fsdp.convert.torch_dist import convert_torch_dist

    convert_torch_dist(args.ckpt, args.hf, args.out, config_from_args(args).model)
    print(f"wrote {args.out} (start training from it with checkpoint.load={args.out})")
    return 0


def inspect(args: argparse.Namespace) -> int:
    from vlm_fsdp.convert.inspect_checkpoint import inspect_checkpoint, render

    report = inspect_checkpoint(args.checkpoint, verify=not args.no_verify)
    print(json.dumps(report, indent=2, default=str) if args.json else render(report))
    return 1 if report["problems"] else 0
