"""What a run ran with: package versions, where Megatron-Core came from, the git commit, the command line."""

from __future__ import annotations

import json
import platform
import socket
import subprocess
import sys
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

import yaml
from vlm_fsdp.config.overrides import to_dict
from vlm_fsdp.config.run import Config

PACKAGES = (
    "vlm-fsdp",
    "vlm-fsdp-recipes",
    "torch",
    "transformers",
    "megatron-core",
    "megatron-energon",
    "transformer-engine",
)


def package_source(name: str) -> dict[str, Any] | None:
    """Version of an installed distribution and where it came from (a registry, a git commit, a directory)."""
    try:
        dist = distribution(name)
    except PackageNotFoundError:
        return None
    info: dict[str, Any] = {"version": dist.version, "source": "package index"}
    direct = dist.read_text("direct_url.json")
    if direct:
        url = json.loads(direct)
        if "vcs_info" in url:
            vcs = url["vcs_info"]
            info["source"] = f"{vcs.get('vcs', 'git')}+{url['url']}@{vcs.get('commit_id', '?')}"
            if vcs.get("requested_revision"):
                info["requested_revision"] = vcs["requested_revision"]
        elif url.get("dir_info", {}).get("editable"):
            info["source"] = f"editable {url['url']}"
        else:
            info["source"] = url["url"]
    return info


def git_commit(path: Path) -> str | None:
    """The commit checked out at `path` ('+dirty' when it has uncommitted changes), if it is a git work tree."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=path,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    return {
        "time_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(argv if argv is not None else sys.argv),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "git_commit": git_commit(Path(__file__).resolve().parent),
        "packages": {name: info for name in PACKAGES if (info := package_source(name)) is not None},
    }


def write_run_record(directory: Path, config: Config, argv: list[str] | None = None) -> Path:
    """Write `config.yaml` (the resolved config plus a `provenance` section) into a run's directory."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yaml"
    record = to_dict(config) | {"provenance": provenance(argv)}
    path.write_text(yaml.safe_dump(record, sort_keys=False))
    return path
