"""sbatch scripts for multi-node training, one per recipe and layout (`vlm-fsdp slurm` prints them).

The script starts one `vlm-fsdp train` per node with `srun --ntasks-per-node=1`; each of them starts the node's
ranks through torch.distributed.run, and all meet at a c10d rendezvous on the job's first node. Before the time
limit Slurm sends the batch shell USR1 (`--signal=B:USR1@300`); the script passes it on through srun to the ranks,
which finish their step, save a checkpoint and exit 0 (`vlm_fsdp.train.stopping`); then it requeues the job. A
SIGTERM (preemption, `scancel`) is passed on the same way, without the requeue. A requeued (or preempted and
requeued) run passes `--resume`, so training continues from the latest checkpoint in the job's own output
directory.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from vlm_fsdp.config.load import load_config
from vlm_fsdp.config.recipes import recipe_summary

# Seconds before the time limit at which Slurm signals the batch shell: enough to finish a step and save.
REQUEUE_WARNING_S = 300


@dataclass(frozen=True, kw_only=True)
class SlurmJob:
    """What `vlm-fsdp slurm` was asked for."""

    recipe: str
    nodes: int
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0
    """Memory of one GPU, which the run was checked to fit into."""
    config_file: str | None = None
    overrides: tuple[str, ...] = ()
    container: str | None = None
    """Container image for the Pyxis/enroot srun plugin; the checkout is mounted at the same path."""
    pixi: bool = False
    """Run through `pixi run` (installing the locked workspace once, on the first node, before the ranks start)."""

    def command(self) -> list[str]:
        """The `vlm-fsdp slurm` command line that prints this job's script."""
        words = ["vlm-fsdp", "slurm", "--recipe", self.recipe, "--nodes", str(self.nodes)]
        words += ["--gpus-per-node", str(self.gpus_per_node)]
        if self.gpu_memory_gib != 80.0:
            words += ["--gpu-memory", f"{self.gpu_memory_gib:g}"]
        if self.container:
            words += ["--container", self.container]
        if self.pixi:
            words.append("--pixi")
        if self.config_file:
            words += ["--config-file", self.config_file]
        return words + list(self.overrides)


def sbatch_script(job: SlurmJob) -> str:
    """The sbatch script of a job, after validating its config on nodes x gpus_per_node GPUs (ConfigError if not)."""
    world = job.nodes * job.gpus_per_node
    config = load_config(job.recipe, config_file=job.config_file, overrides=list(job.overrides), world_size=world)
    m = config.model

    srun = ['--export=ALL --ntasks-per-node=1 --kill-on-bad-exit=1 --output="${log_dir}/%N.log"']
    train = "vlm-fsdp train"
    prepare = ""
    if job.container:
        environment = f"# Ranks run in the container image {job.container}, which has the workspace installed."
        srun.append(
            f'--container-image={shlex.quote(job.container)} --container-mounts="${{PWD}}:${{PWD}}" '
            '--container-workdir="${PWD}"'
        )
    elif job.pixi:
        environment = "# Ranks run in the pixi workspace of this checkout (`pixi run`)."
        train = f"pixi run --frozen uv run --frozen --no-sync {train}"
        prepare = (
            "\n# Install the locked workspace once, here, before every node starts from the same environment.\n"
            "pixi run --frozen uv sync --frozen\n"
        )
    else:
        environment = "# Ranks run in the environment active at submission: activate the workspace's first."
        prepare = (
            "\nif ! command -v vlm-fsdp >/dev/null; then\n"
            '  echo "vlm-fsdp is not on PATH: activate the workspace environment (source .venv/bin/activate)'
            ' and submit again" >&2\n'
            "  exit 1\n"
            "fi\n"
        )

    start = ["--recipe", job.recipe] + (["--config-file", job.config_file] if job.config_file else [])
    overrides = [shlex.quote(o) for o in job.overrides]
    if config.train.output_dir is None:
        # A fixed output directory per job, so that a requeued run finds its checkpoints.
        overrides.append('train.output_dir="runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}"')
    srun_options = " \\\n  ".join(srun)
    arguments = " \\\n  ".join([shlex.join(start)] + ([" ".join(overrides)] if overrides else []))

    lines = [
        "#!/bin/bash",
        f"# {job.recipe} - {recipe_summary(job.recipe)}",
        f"# {job.nodes} nodes x {job.gpus_per_node} GPUs: data-parallel {world}, "
        f"expert-parallel {m.expert_model_parallel_size}; sharding {config.ddp.data_parallel_sharding_strategy}.",
        "# Printed by (regenerate rather than edit):",
        f"#   {shlex.join(job.command())}",
        "# Submit from the root of the checkout; sbatch options given on its command line override the ones below:",
        "#   sbatch --partition=PARTITION --account=ACCOUNT --time=04:00:00 THIS_SCRIPT",
        environment,
        f"#SBATCH --job-name={job.recipe}",
        f"#SBATCH --nodes={job.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={job.gpus_per_node}",
        "#SBATCH --exclusive",
        "#SBATCH --output=%x-%j.log",
        "#SBATCH --open-mode=append",
        "#SBATCH --export=ALL",
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR1@{REQUEUE_WARNING_S}",
    ]
    body = f"""set -euo pipefail

# Near the time limit (USR1, --signal above) and on SIGTERM, the ranks are asked (through srun) to finish their
# step and save a checkpoint; after the time-limit signal the job is then put back in the queue, and the next run
# resumes from that checkpoint.
step=""
requeue=0
interrupted=0
# shellcheck disable=SC2329  # called by the traps
stop() {{
  echo "$(date -u +%FT%TZ) $1: asking the ranks to finish their step and save a checkpoint"
  interrupted=1
  if [ "$1" = USR1 ]; then requeue=1; fi
  if [ -n "${{step}}" ]; then kill -"$1" "${{step}}" 2>/dev/null || true; fi
}}
trap 'stop USR1' USR1
trap 'stop TERM' TERM

resume=()
if [ "${{SLURM_RESTART_COUNT:-0}}" -gt 0 ]; then
  resume=(--resume)
fi
{prepare}
mapfile -t nodes < <(scontrol show hostnames "${{SLURM_JOB_NODELIST}}")
head_node=${{nodes[0]}}
port=$((20000 + SLURM_JOB_ID % 20000))
log_dir="logs/${{SLURM_JOB_NAME}}-${{SLURM_JOB_ID}}"
mkdir -p "${{log_dir}}"
echo "$(date -u +%FT%TZ) job ${{SLURM_JOB_ID}} (restart ${{SLURM_RESTART_COUNT:-0}}): ${{SLURM_NNODES}} nodes," \\
  "rendezvous ${{head_node}}:${{port}}, node logs in ${{log_dir}}/"

# Environment of every rank: the submitting shell's (--export=ALL, for sbatch and srun) plus what is exported
# here, without CUDA_DEVICE_MAX_CONNECTIONS (removed on each node, inside a container too): Megatron-FSDP needs
# several connections per device so that its all-gathers and reduce-scatters overlap compute.
export PYTHONUNBUFFERED=1

srun {srun_options} \\
  env -u CUDA_DEVICE_MAX_CONNECTIONS \\
  {train} \\
  --nnodes "${{SLURM_NNODES}}" --nproc-per-node {job.gpus_per_node} --rdzv-endpoint "${{head_node}}:${{port}}" \\
  {arguments} \\
  "${{resume[@]}}" &
step=$!
# A trapped signal ends `wait` early: wait again until it returns the training step's own exit status.
while :; do
  interrupted=0
  status=0
  wait "${{step}}" || status=$?
  if [ "${{interrupted}}" = 0 ]; then break; fi
done
if [ "${{requeue}}" = 1 ]; then
  echo "$(date -u +%FT%TZ) time limit in {REQUEUE_WARNING_S} s: requeueing job ${{SLURM_JOB_ID}}"
  scontrol requeue "${{SLURM_JOB_ID}}"
fi
exit "${{status}}"
"""
    return "\n".join(lines) + "\n" + body
