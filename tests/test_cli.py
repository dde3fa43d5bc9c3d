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
