"""The workspace itself: pixi manifest, nox sessions, README commands, CI script, provenance records."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from vlm_fsdp import provenance as prov
from vlm_fsdp.cli.main import build_parser
from vlm_fsdp.config import load_config

SCHEMA = Path(__file__).resolve().parents[2] / "shared" / "schemas" / "pixi-manifest-v0.77.0.schema.json"


def nox_sessions(root: Path) -> set[str]:
    import nox.registry

    spec = importlib.util.spec_from_file_location("noxfile_under_test", root / "noxfile.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    return set(nox.registry.get())


def cli_subcommands() -> set[str]:
    (action,) = [a for a in build_parser()._actions if a.dest == "command"]
    return set(action.choices)


def readme_commands(root: Path) -> list[str]:
    """Shell lines of the README's code blocks."""
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", (root / "README.md").read_text(), re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_pixi_manifest_validates_against_the_published_schema(root):
    if not SCHEMA.is_file():
        pytest.skip(f"pixi's manifest schema is not at {SCHEMA} (it is provided beside the clone in CI)")
    import jsonschema

    manifest = tomllib.loads((root / "pixi.toml").read_text())
    jsonschema.validate(manifest, json.loads(SCHEMA.read_text()))


def test_pixi_pins_the_toolchain(root):
    manifest = tomllib.loads((root / "pixi.toml").read_text())
    tools = manifest["feature"]["toolchain"]["dependencies"]
    assert tools["python"] == "3.12.*" and "uv" in tools and "nox" in tools
    assert "cuda-toolkit" in manifest["feature"]["cuda"]["dependencies"]
    assert set(manifest["environments"]) == {"default", "cuda"}
    assert manifest["dependencies"] == {}


def test_every_pixi_task_runs_a_nox_session_or_cli_subcommand_given_in_the_readme(root):
    tasks = tomllib.loads((root / "pixi.toml").read_text())["tasks"]
    assert set(tasks) == {"train", "test", "docs", "lint", "bench", "container"}
    sessions, subcommands, readme = nox_sessions(root), cli_subcommands(), readme_commands(root)
    for name, task in tasks.items():
        words = shlex.split(task["cmd"])
        assert words[:2] == ["uv", "run"], name
        if words[2] == "nox":
            named = [words[i + 1] for i, w in enumerate(words) if w == "-s"] + words[words.index("-s") + 2 :]
            assert named and set(named) <= sessions, f"task {name} names unknown nox sessions {named}"
        else:
            assert words[2] == "vlm-fsdp" and words[3] in subcommands, f"task {name}: {task['cmd']}"
        assert task["cmd"] in readme, f"task {name}'s command is not given in the README"


def test_nox_sessions_and_defaults(root):
    import nox

    assert {"lint", "tests", "gpu", "docs", "bench", "container"} <= nox_sessions(root)
    assert nox.options.sessions == ["lint", "tests"]
    assert nox.options.default_venv_backend == "uv"


def test_ci_runs_the_readme_test_command(root):
    ci = (root / ".ci" / "run").read_text()
    test_command = tomllib.loads((root / "pixi.toml").read_text())["tasks"]["test"]["cmd"]
    assert test_command in readme_commands(root)
    assert test_command in ci.splitlines()
    assert "pip install" in ci and "uv" in ci and "CI=true" in ci


def test_readme_describes_every_top_level_folder(root):
    readme = (root / "README.md").read_text()
    folders = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")} - {
        "tests",
        "runs",
        "build",
        "site",
    }
    for folder in {"packages", "recipes", "ci", "docs", "slurm"} | folders:
        assert re.search(rf"^\| `{folder}/` \|", readme, re.M), f"README does not describe {folder}/"


def test_provenance_records_megatron_core_version_and_source(tmp_path):
    path = prov.write_run_record(tmp_path, load_config("tiny"), ["vlm-fsdp", "train"])
    record = yaml.safe_load(path.read_text())
    mcore = record["provenance"]["packages"]["megatron-core"]
    assert mcore["version"] == "0.16.1"
    assert mcore["source"] == "package index"
    assert record["provenance"]["command"] == "vlm-fsdp train"
    assert record["provenance"]["git_commit"] is None or re.fullmatch(
        r"[0-9a-f]{40}(\+dirty)?", record["provenance"]["git_commit"]
    )
    assert record["model"]["num_layers"] == 4
    # the saved file is a valid --config-file for the same recipe
    assert load_config("tiny", config_file=path) == load_config("tiny")


def test_provenance_names_a_git_source_of_megatron_core(monkeypatch):
    class GitDist:
        version = "0.17.0rc0"

        def read_text(self, name):
            return json.dumps(
                {
                    "url": "https://github.com/example/Megatron-LM.git",
                    "vcs_info": {"vcs": "git", "commit_id": "abc123", "requested_revision": "dev"},
                }
            )

    monkeypatch.setattr(prov, "distribution", lambda name: GitDist())
    info = prov.package_source("megatron-core")
    assert info == {
        "version": "0.17.0rc0",
        "source": "git+https://github.com/example/Megatron-LM.git@abc123",
        "requested_revision": "dev",
    }
