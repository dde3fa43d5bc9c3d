"""`vlm-fsdp slurm`: print an sbatch script that trains a recipe on several nodes of a Slurm cluster."""

from __future__ import annotations

import argparse

from vlm_fsdp.cli.common import add_config_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "slurm",
        help="print an sbatch script that trains a recipe on several nodes",
        description="Check the run's config on NODES x GPUS_PER_NODE GPUs, then print an sbatch script that "
        "starts `vlm-fsdp train` once per node with srun (rendezvous on the first node), forwards the "
        "environment, writes a log per job and per node, and requeues itself shortly before the time limit "
        "(or after preemption) to resume from the latest checkpoint. Save it and submit it from the root of "
        "the checkout: vlm-fsdp slurm --recipe qwen3_vl_30b_a3b --nodes 2 > job.sh && sbatch job.sh",
    )
    add_config_arguments(parser)
    parser.add_argument("--nodes", type=int, required=True, metavar="N", help="nodes of the job")
    parser.add_argument(
        "--gpus-per-node", type=int, default=8, metavar="G", help="GPUs (ranks) per node (default: 8; GB200: 4)"
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--container",
        metavar="IMAGE",
        help="run every node in this container image through the Pyxis srun plugin (e.g. one built from "
        "ci/Dockerfile and imported with enroot); default: the environment active at submission",
    )
    where.add_argument(
        "--pixi",
        action="store_true",
        help="run through pixi in the checkout (installs the locked workspace once before the ranks start)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlm_fsdp.errors import UserError
    from vlm_fsdp.launch.slurm import SlurmJob, sbatch_script

    if args.nodes < 1:
        raise UserError("--nodes must be at least 1")
    if args.gpus_per_node < 1:
        raise UserError("--gpus-per-node must be at least 1")
    job = SlurmJob(
        recipe=args.recipe,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        config_file=args.config_file,
        overrides=tuple(args.overrides),
        container=args.container,
        pixi=args.pixi,
    )
    print(sbatch_script(job), end="")
    return 0
