"""`vlm-fsdp data prepare | inspect | bench`: make, look into and time training datasets."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlm_fsdp.cli.common import add_config_arguments, config_from_args
from vlm_fsdp.errors import UserError

REPORT = "prepare_report.jsonl"
"""As vlm_fsdp.data.prepare.REPORT (not imported here: the parser is built without the data pipeline's imports)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data",
        help="prepare, inspect and benchmark image-text datasets",
        description="Turn a conversation JSONL into a Megatron-Energon dataset (prepare), show what a dataset "
        "holds (inspect) and measure the data loader's throughput on this machine (bench). The JSONL format: one "
        'sample per line, {"messages": [{"role": "user", "content": [{"type": "image", "image": "photo.jpg"}, '
        '{"type": "text", "text": "..."}]}, {"role": "assistant", "content": "..."}]}, image paths relative to '
        "the JSONL file.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True, help="prepare, inspect or bench")

    prepare = actions.add_parser(
        "prepare",
        help="convert a conversation JSONL into an Energon dataset",
        description="Check every sample (format, images decodable), write the usable ones as WebDataset shards "
        "with train and val splits, and index them with Energon. Unusable samples (lines that are not UTF-8 or not "
        "JSON, malformed conversations, missing, corrupt or unsupported images) are skipped: the console shows the "
        f"first ones, OUTPUT_DIR/{REPORT} lists every one with its line number and reason. The dataset appears in "
        "OUTPUT_DIR only once it is complete.",
    )
    prepare.add_argument("input", type=Path, metavar="INPUT.jsonl", help="training conversations")
    prepare.add_argument("output", type=Path, metavar="OUTPUT_DIR", help="new or empty directory for the dataset")
    group = prepare.add_mutually_exclusive_group()
    group.add_argument("--val", type=Path, metavar="VAL.jsonl", help="validation conversations (the val split)")
    group.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="put this fraction of INPUT's samples into the val split, chosen by a hash of each line (default: 0)",
    )
    prepare.add_argument(
        "--samples-per-shard", type=int, default=1000, metavar="N", help="samples per tar file (default: 1000)"
    )
    prepare.add_argument(
        "--allow-outside-paths",
        action="store_true",
        help="accept image paths that lead outside the folder of the JSONL file: absolute paths, '..' and "
        "symlinks to elsewhere (by default such samples are skipped, so a JSONL cannot pull in other files)",
    )
    prepare.set_defaults(func=run_prepare)

    inspect = actions.add_parser(
        "inspect",
        help="counts, image sizes and token lengths of a dataset",
        description="Print per split: samples, images, images per sample, original image sizes, the sizes images "
        "are resized to, and token lengths under the run's tokenizer, image settings and model.seq_length (from "
        "the recipe and overrides, as for train).",
    )
    inspect.add_argument("dir", type=Path, metavar="DIR", help="a dataset made by `vlm-fsdp data prepare`")
    add_config_arguments(inspect)
    inspect.add_argument("--json", action="store_true", help="print the report as one JSON object")
    inspect.set_defaults(func=run_inspect)

    bench = actions.add_parser(
        "bench",
        help="samples/s, images/s and tokens/s of the data loader",
        description="Run the run's train loader (data.path, or the bundled data) on this machine and print its "
        "throughput after a warm-up that includes starting the workers.",
    )
    add_config_arguments(bench)
    bench.add_argument("--workers", type=int, metavar="N", help="worker processes (default: data.num_workers)")
    bench.add_argument("--microbatches", type=int, default=50, metavar="N", help="microbatches to time (default 50)")
    bench.add_argument("--warmup", type=int, default=5, metavar="N", help="microbatches before timing (default 5)")
    bench.add_argument("--json", action="store_true", help="print the result as one JSON object")
    bench.set_defaults(func=run_bench)


def run_prepare(args: argparse.Namespace) -> int:
    from vlm_fsdp.data.prepare import prepare

    summary = prepare(
        args.input,
        args.output,
        val=args.val,
        val_fraction=args.val_fraction,
        samples_per_shard=args.samples_per_shard,
        allow_outside_paths=args.allow_outside_paths,
        progress=sys.stderr.isatty(),
    )
    print(summary.render(args.output))
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from vlm_fsdp.data.inspect import inspect_dataset, render
    from vlm_fsdp.data.settings import resolve

    check_dataset_dir(args.dir)
    config = config_from_args(args)
    config.data.path = str(args.dir)
    settings = resolve(config)
    report = inspect_dataset(settings)
    print(json.dumps(report, indent=2) if args.json else render(report, settings))
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from vlm_fsdp.data.bench import bench, render

    config = config_from_args(args)
    if config.data.path is not None:
        check_dataset_dir(Path(config.data.path).expanduser(), "data.path=")
    if args.workers is not None:
        config.data.num_workers = args.workers
    if (args.workers is not None and args.workers < 0) or args.microbatches < 1 or args.warmup < 1:
        raise UserError("--workers must be >= 0, --microbatches and --warmup >= 1")
    result = bench(config, microbatches=args.microbatches, warmup=args.warmup)
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


def check_dataset_dir(path: Path, label: str = "") -> None:
    """UserError unless `path` is a directory (whether it is a dataset, SplitReader says)."""
    try:
        problem = None if path.is_dir() else "is not a directory" if path.exists() else "does not exist"
    except OSError as err:
        problem = f"cannot be read ({err.strerror or err})"
    if problem:
        raise UserError(f"{label}{path} {problem}: give the folder that `vlm-fsdp data prepare` made")
