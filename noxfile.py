"""Sessions of vlm-fsdp. Each installs the workspace from uv.lock (`uv sync --frozen`) into its own environment.

    nox                       lint + tests (what CI runs)
    nox -s gpu                GPU functional tests (skips when no CUDA device is present)
    nox -s docs | bench | container
Arguments after `--` go to the session's command (`nox -s tests -- -k plan`).
"""

from __future__ import annotations

import nox

nox.needs_version = ">=2025.5"
nox.options.default_venv_backend = "uv"
nox.options.sessions = ["lint", "tests"]
nox.options.error_on_external_run = True


def sync(session: nox.Session, *args: str) -> None:
    """Install exactly the locked packages into this session's environment."""
    session.run_install(
        "uv",
        "sync",
        "--frozen",
        *args,
        env={"UV_PROJECT_ENVIRONMENT": session.virtualenv.location},
        external=True,
    )


@nox.session(tags=["ci"])
def lint(session: nox.Session) -> None:
    """ruff lint and format check, and a check that uv.lock matches the pyproject files."""
    sync(session, "--only-group", "dev")
    session.run("uv", "lock", "--check", external=True)
    session.run("ruff", "check", *session.posargs)
    session.run("ruff", "format", "--check")


@nox.session(tags=["ci"])
def tests(session: nox.Session) -> None:
    """The CPU test suite."""
    sync(session)
    session.run("pytest", "-m", "not gpu", *session.posargs)


@nox.session(default=False)
def gpu(session: nox.Session) -> None:
    """GPU functional tests: train + save + resume, Hugging Face parity."""
    sync(session)
    has_gpu = session.run("python", "-c", "import torch; print(torch.cuda.is_available())", silent=True)
    if "True" not in (has_gpu or ""):
        session.skip("no CUDA device is visible (torch.cuda.is_available() is false): GPU tests need one")
    session.run("pytest", "-m", "gpu", *session.posargs)


@nox.session(default=False)
def docs(session: nox.Session) -> None:
    """Build the user guide with every warning treated as an error."""
    sync(session, "--group", "docs")
    session.run("mkdocs", "build", "--strict", *session.posargs)


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Throughput of vlm-fsdp against transformers and transformers + Liger on one GPU (table, PNG, JSON)."""
    sync(session, "--extra", "bench")
    session.run("vlm-fsdp", "bench", *session.posargs)


@nox.session(default=False, venv_backend="none")
def container(session: nox.Session) -> None:
    """Build the training container image from ci/Dockerfile with docker or podman."""
    import shutil
    import subprocess
    import tomllib

    engine = next((e for e in ("docker", "podman") if shutil.which(e)), None)
    if engine is None:
        session.skip("neither docker nor podman is installed: cannot build the container image here")
    if subprocess.run([engine, "info"], capture_output=True).returncode != 0:
        session.skip(f"{engine} is installed but no container engine is running: cannot build the image here")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    with open("packages/core/pyproject.toml", "rb") as f:
        version = tomllib.load(f)["project"]["version"]
    session.run(
        engine,
        "build",
        "-f",
        "ci/Dockerfile",
        "--build-arg",
        f"GIT_COMMIT={commit or 'unknown'}",
        "--build-arg",
        f"VERSION={version}",
        "-t",
        "vlm-fsdp:latest",
        *session.posargs,
        ".",
        external=True,
    )
