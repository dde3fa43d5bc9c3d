"""The `vlm-fsdp` command line: help for every subcommand, clean errors, train without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from vlm_fsdp.cli.main import build_parser, main


def subcommands() -> list[str]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if a.dest == "command"]
    return sorted(action.choices)


def test_core_subcommands_exist():
    assert {"train", "plan", "config", "recipes"} <= set(subcommands())


@pytest.mark.parametrize("command", subcommands())
def test_every_subcommand_has_complete_help(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: vlm-fsdp {command}")
    parser = build_parser()
    (action,) = [a for a in parser._actions if a.dest == "command"]
    sub = action.choices[command]
    assert sub.description, f"{command} has no description"
    for arg in sub._actions:
        assert arg.help, f"{command} {arg.option_strings or arg.dest} has no help"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vlm_fsdp.cli.main", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def test_train_without_gpu_stops_cleanly_and_points_to_plan():
    result = run_cli("train", env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "needs a CUDA GPU" in result.stderr
    assert "vlm-fsdp plan --recipe tiny" in result.stderr


def test_mistyped_key_is_rejected_with_a_suggestion_and_no_traceback():
    result = run_cli("plan", "model.seq_lenght=8192")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "unknown config key 'model.seq_lenght'. Did you mean model.seq_length?" in result.stderr


def test_config_prints_resolved_yaml(capsys):
    assert main(["config", "--recipe", "qwen3_vl_30b_a3b", "model.seq_length=8192"]) == 0
    out = capsys.readouterr().out
    assert "seq_length: 8192" in out
    assert "data_parallel_sharding_strategy: optim_grads_params" in out


def test_recipes_lists_recipes_with_summaries(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "qwen3_vl_235b_a22b" in out and "Qwen3-VL-235B-A22B-Instruct" in out


def test_recipes_show_the_whole_first_paragraph_of_the_docstring(capsys):
    assert main(["recipes"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("tiny "))
    assert line.endswith("on several GPUs lower train.micro_batch_size to global_batch_size / GPUs or below.")


def test_bad_config_input_gives_one_line_and_exit_2_without_traceback():
    result = run_cli("config", "train.micro_batch_size=0", "model.seq_length=!!bool 1")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("vlm-fsdp config: error: override 'model.seq_length=!!bool 1': YAML tags")


def slurm_args(root, recipe: str, nodes: int, gpus_per_node: int = 8) -> list[str]:
    layout = ["--nodes", str(nodes), "--gpus-per-node", str(gpus_per_node)]
    return ["slurm", "--recipe", recipe, *layout, "--config-file", str(root / "recipes" / f"{recipe}_mfsdp.yaml")]


def test_slurm_refuses_a_layout_that_does_not_fit_in_memory(capsys, root):
    assert main(slurm_args(root, "qwen3_vl_30b_a3b", 1)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert "1 x 8 GPUs: DOES NOT FIT in memory:" in captured.err
    assert "Suggestion: the same config fits on 16 GPUs (2 expert-parallel groups of 8)" in captured.err
    assert "vlm-fsdp plan --recipe qwen3_vl_30b_a3b --gpus 8 --gpu-memory 80" in captured.err


def test_slurm_takes_the_memory_of_larger_gpus(capsys, root):
    assert main(slurm_args(root, "qwen3_vl_235b_a22b", 4)) == 2
    assert "DOES NOT FIT in memory" in capsys.readouterr().err
    assert main([*slurm_args(root, "qwen3_vl_235b_a22b", 4), "--gpu-memory", "180"]) == 0
    assert capsys.readouterr().out.startswith("#!/bin/bash\n# qwen3_vl_235b_a22b - ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nodes", "0"], "--nodes must be between 1 and 1,048,576, got 0"),
        (["--nodes", "2", "--gpus-per-node", "0"], "--gpus-per-node must be between 1 and 1,024, got 0"),
        (["--nodes", "1048576", "--gpus-per-node", "8"], "--nodes x --gpus-per-node must be between 1 and 1,048,576"),
        (["--nodes", "1", "--gpu-memory", "nan"], "--gpu-memory must be a positive number of GiB"),
    ],
)
def test_slurm_refuses_bad_sizes(capsys, args, message):
    assert main(["slurm", "--recipe", "tiny", *args]) == 2
    assert message in capsys.readouterr().err
