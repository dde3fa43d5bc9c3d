"""`vlm-fsdp slurm`: print an sbatch script that trains a recipe on several nodes of a Slurm cluster."""

from __future__ import annotations

import argparse
import shlex

from vlm_fsdp.cli.common import add_config_arguments, add_gpu_memory_argument, check_gpu_memory, check_gpus
from vlm_fsdp.config.run import Config

# Most GPUs per node taken (a node of 8 GPUs is usual; 72 is an NVL72 rack seen as one node).
MAX_GPUS_PER_NODE = 1024


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "slurm",
        help="print an sbatch script that trains a recipe on several nodes",
        description="Check the run's config on NODES x GPUS_PER_NODE GPUs, and that it fits in their memory as "
        "`vlm-fsdp plan` estimates it (with the plan's reason and a layout that fits when it does not), then print "
        "an sbatch script that starts `vlm-fsdp train` once per node with srun (rendezvous on the first node), "
        "forwards the environment, writes a log per job and per node, and requeues itself shortly before the time "
        "limit (or after preemption) to resume from the latest checkpoint. Save it and submit it from the root of "
        "the checkout: vlm-fsdp slurm --recipe qwen3_vl_30b_a3b --nodes 2 > job.sh && sbatch job.sh",
    )
    add_config_arguments(parser)
    parser.add_argument("--nodes", type=int, required=True, metavar="N", help="nodes of the job")
    parser.add_argument(
        "--gpus-per-node", type=int, default=8, metavar="G", help="GPUs (ranks) per node (default: 8; GB200: 4)"
    )
    add_gpu_memory_argument(parser)
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
    from vlm_fsdp.config.load import load_config
    from vlm_fsdp.launch.slurm import SlurmJob, sbatch_script

    check_gpus("--nodes", args.nodes)
    check_gpus("--gpus-per-node", args.gpus_per_node, high=MAX_GPUS_PER_NODE)
    check_gpu_memory(args.gpu_memory)
    gpus = args.nodes * args.gpus_per_node
    check_gpus("--nodes x --gpus-per-node", gpus)
    config = load_config(args.recipe, config_file=args.config_file, overrides=args.overrides, world_size=gpus)
    refuse_out_of_memory(config, args, gpus)
    job = SlurmJob(
        recipe=args.recipe,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        gpu_memory_gib=args.gpu_memory,
        config_file=args.config_file,
        overrides=tuple(args.overrides),
        container=args.container,
        pixi=args.pixi,
    )
    print(sbatch_script(job), end="")
    return 0


def refuse_out_of_memory(config: Config, args: argparse.Namespace, gpus: int) -> None:
    """UserError with the plan's verdict and suggestion when the run does not fit in the GPUs' memory."""
    from vlm_fsdp.errors import UserError
    from vlm_fsdp.plan.report import default_image_share, make_plan, suggestion_text, verdict_text

    plan = make_plan(config, gpus=gpus, gpu_memory_gib=args.gpu_memory, image_share=default_image_share(config))
    if plan["memory_fits"]:
        return
    check = ["vlm-fsdp", "plan", "--recipe", args.recipe, "--gpus", str(gpus), "--gpu-memory", f"{args.gpu_memory:g}"]
    check += ["--config-file", args.config_file] if args.config_file else []
    raise UserError(
        f"{args.nodes} x {args.gpus_per_node} GPUs: {verdict_text(plan)}. Suggestion: {suggestion_text(plan)}. "
        f"The breakdown: {shlex.join(check + list(args.overrides))}"
    )
