#!/bin/bash
# qwen3_vl_30b_a3b - Qwen3-VL-30B-A3B-Instruct: 48 layers, 128 experts (top-8), 2048 wide; 27-block vision tower.
# 2 nodes x 8 GPUs: data-parallel 16, expert-parallel 8; sharding optim_grads_params.
# Printed by (regenerate rather than edit):
#   vlm-fsdp slurm --recipe qwen3_vl_30b_a3b --nodes 2 --gpus-per-node 8 --config-file recipes/qwen3_vl_30b_a3b_mfsdp.yaml
# Submit from the root of the checkout; sbatch options given on its command line override the ones below:
#   sbatch --partition=PARTITION --account=ACCOUNT --time=04:00:00 THIS_SCRIPT
# Ranks run in the environment active at submission: activate the workspace's first.
#SBATCH --job-name=qwen3_vl_30b_a3b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --output=%x-%j.log
#SBATCH --open-mode=append
#SBATCH --export=ALL
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
set -euo pipefail

# Near the time limit (USR1, --signal above) and on SIGTERM, the ranks are asked (through srun) to finish their
# step and save a checkpoint; after the time-limit signal the job is then put back in the queue, and the next run
# resumes from that checkpoint.
step=""
requeue=0
interrupted=0
# shellcheck disable=SC2329  # called by the traps
stop() {
  echo "$(date -u +%FT%TZ) $1: asking the ranks to finish their step and save a checkpoint"
  interrupted=1
  if [ "$1" = USR1 ]; then requeue=1; fi
  if [ -n "${step}" ]; then kill -"$1" "${step}" 2>/dev/null || true; fi
}
trap 'stop USR1' USR1
trap 'stop TERM' TERM

resume=()
if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then
  resume=(--resume)
fi

if ! command -v vlm-fsdp >/dev/null; then
  echo "vlm-fsdp is not on PATH: activate the workspace environment (source .venv/bin/activate) and submit again" >&2
  exit 1
fi

mapfile -t nodes < <(scontrol show hostnames "${SLURM_JOB_NODELIST}")
head_node=${nodes[0]}
port=$((20000 + SLURM_JOB_ID % 20000))
log_dir="logs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}"
mkdir -p "${log_dir}"
echo "$(date -u +%FT%TZ) job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}): ${SLURM_NNODES} nodes," \
  "rendezvous ${head_node}:${port}, node logs in ${log_dir}/"

# Environment of every rank: the submitting shell's (--export=ALL, for sbatch and srun) plus what is exported
# here, without CUDA_DEVICE_MAX_CONNECTIONS (removed on each node, inside a container too): Megatron-FSDP needs
# several connections per device so that its all-gathers and reduce-scatters overlap compute.
export PYTHONUNBUFFERED=1

srun --export=ALL --ntasks-per-node=1 --kill-on-bad-exit=1 --output="${log_dir}/%N.log" \
  env -u CUDA_DEVICE_MAX_CONNECTIONS \
  vlm-fsdp train \
  --nnodes "${SLURM_NNODES}" --nproc-per-node 8 --rdzv-endpoint "${head_node}:${port}" \
  --recipe qwen3_vl_30b_a3b --config-file recipes/qwen3_vl_30b_a3b_mfsdp.yaml \
  train.output_dir="runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}" \
  "${resume[@]}" &
step=$!
# A trapped signal ends `wait` early: wait again until it returns the training step's own exit status.
while :; do
  interrupted=0
  status=0
  wait "${step}" || status=$?
  if [ "${interrupted}" = 0 ]; then break; fi
done
if [ "${requeue}" = 1 ]; then
  echo "$(date -u +%FT%TZ) time limit in 300 s: requeueing job ${SLURM_JOB_ID}"
  scontrol requeue "${SLURM_JOB_ID}"
fi
exit "${status}"
