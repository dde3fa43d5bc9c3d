"""`vlm-fsdp train`: train a recipe on the GPUs of this machine (or of a Slurm allocation)."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
from datetime import UTC, datetime
from pathlib import Path

from vlm_fsdp.cli.common import add_config_arguments, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a recipe (needs a CUDA GPU)",
        description="Train a Qwen3-VL MoE model with Megatron-Core and Megatron-FSDP. With no arguments, trains "
        "the tiny recipe on the bundled image-text data on one GPU. The resolved config and the run's "
        "provenance are printed and saved as config.yaml in train.output_dir. Without a CUDA GPU it stops at "
        "once; use `vlm-fsdp plan` to check a run on the CPU. With --nproc-per-node or --nnodes above 1 it "
        "starts the ranks through torch.distributed.run (one launcher per node).",
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--nproc-per-node", type=int, default=1, metavar="N", help="ranks (GPUs) to start on this node (default: 1)"
    )
    parser.add_argument(
        "--nnodes",
        type=int,
        default=1,
        metavar="N",
        help="nodes taking part; every node runs this same command (default: 1)",
    )
    parser.add_argument(
        "--rdzv-endpoint",
        metavar="HOST:PORT",
        default="localhost:29500",
        help="rendezvous address all nodes reach, e.g. the first node of a Slurm job (default: localhost:29500)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the latest complete checkpoint in checkpoint.save"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlm_fsdp.errors import UserError

    launched = "LOCAL_RANK" in os.environ
    world_size = int(os.environ["WORLD_SIZE"]) if launched else args.nproc_per_node * args.nnodes
    config = config_from_args(args, world_size)  # config and layout mistakes before anything else
    if cuda_devices() == 0:
        raise UserError(
            "training needs a CUDA GPU and none is visible here. To check a run's parameters, FLOPs, memory "
            f"and layout on this machine, use: vlm-fsdp plan --recipe {args.recipe}"
            + (f" --config-file {args.config_file}" if args.config_file else "")
            + "".join(f" {o}" for o in args.overrides)
        )
    if config.train.output_dir is None:
        # fixed here, before any rank starts, so that every rank writes to the same directory
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        args.overrides.append(f"train.output_dir=runs/{config.recipe}-{stamp}")
        config = config_from_args(args, world_size)
    if world_size > 1 and not launched:
        return launch(args)
    from vlm_fsdp.known_warnings import silence

    silence()
    from vlm_fsdp.train.loop import train

    train(config, resume=args.resume)
    return 0


def cuda_devices() -> int:
    """How many CUDA devices this process sees, asked of the driver directly (importing torch to ask takes
    seconds); 0 without a driver."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def _children() -> list[int]:
    """Process ids of this process's children (the ranks torch.distributed.run started), from /proc."""
    me, found = str(os.getpid()), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == me:
            found.append(int(stat.parent.name))
    return found


def _pass_stop_signals_to_ranks() -> None:
    """A stop signal to this launcher reaches its ranks as SIGUSR1 (stop after the step, with a checkpoint;
    `vlm_fsdp.train.stopping`), and the launcher keeps waiting for them to finish. torch.distributed.run would
    otherwise answer SIGTERM and SIGINT by killing the ranks 30 s later, in the middle of their save."""
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGHUP,SIGQUIT"

    def forward(number, frame) -> None:
        for pid in _children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)

    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(number, forward)


def launch(args: argparse.Namespace) -> int:
    """Re-run this command once per rank through torch.distributed.run (c10d rendezvous)."""
    from torch.distributed.run import main as torchrun

    _pass_stop_signals_to_ranks()

    child = [
        "--recipe",
        args.recipe,
        *(["--config-file", args.config_file] if args.config_file else []),
        *(["--resume"] if args.resume else []),
        *args.overrides,
    ]
    torchrun(
        [
            f"--nproc-per-node={args.nproc_per_node}",
            f"--nnodes={args.nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={args.rdzv_endpoint}",
            "-m",
            "vlm_fsdp.cli.main",
            "train",
            *child,
        ]
    )
    return 0
