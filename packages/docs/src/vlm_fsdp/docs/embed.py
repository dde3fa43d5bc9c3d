"""Command output embedded in hand-written pages at build time, so figures in the guide are the code's own.

A line `{{ vlm-fsdp plan --recipe qwen3_vl_30b_a3b --gpus 8 }}` becomes a console block with the command and
what it prints. Only commands that print and change nothing may be embedded.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
from pathlib import Path

from vlm_fsdp.cli.main import main

EMBED = re.compile(r"^\{\{ (vlm-fsdp .*) \}\}$", re.M)
READ_ONLY = ("plan", "config", "recipes", "slurm")


class EmbedError(Exception):
    """An embedded command that may not run or that failed."""


def run(words: list[str], root: Path) -> str:
    """What `vlm-fsdp ...` prints when run from `root` (the root of the checkout)."""
    if len(words) < 2 or words[1] not in READ_ONLY:
        raise EmbedError(f"`{shlex.join(words)}`: only {', '.join(READ_ONLY)} can be embedded")
    out, err = io.StringIO(), io.StringIO()
    cwd = Path.cwd()
    os.chdir(root)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(words[1:])
    finally:
        os.chdir(cwd)
    # plan exits 1 for a run that does not fit: that verdict is worth showing; 2 is a user error.
    if status not in (0, 1) or err.getvalue():
        raise EmbedError(f"`{shlex.join(words)}` failed: {err.getvalue().strip()}")
    return out.getvalue()


def expand(markdown: str, root: Path) -> str:
    """The page with every embed line replaced by the command and its output."""

    def block(match: re.Match) -> str:
        words = shlex.split(match.group(1))
        return f"```console\n$ {shlex.join(words)}\n{run(words, root).rstrip()}\n```"

    return EMBED.sub(block, markdown)
