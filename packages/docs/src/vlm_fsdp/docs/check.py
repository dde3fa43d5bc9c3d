"""Checks that hand-written pages speak of the code as it is: every `section.key` they spell exists, every YAML
block is a valid config file, and every `vlm-fsdp ...` command parses and loads a valid config.

Only code is checked (inline code spans and fenced blocks), where keys and commands are spelled exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import yaml
from vlm_fsdp.cli.main import build_parser
from vlm_fsdp.config.fields import field_types, is_config_class
from vlm_fsdp.config.load import load_config
from vlm_fsdp.config.overrides import all_keys, apply_mapping
from vlm_fsdp.config.run import Config
from vlm_fsdp.docs.embed import EMBED
from vlm_fsdp.docs.reference import subparsers
from vlm_fsdp.errors import UserError

# Subcommands the guide documents that the vlm-fsdp-convert package registers through the `vlm_fsdp.cli` entry
# points. Where it does not register them (yet), their spelling cannot be checked, and the build says so.
EXTERNAL_COMMANDS = frozenset({"convert", "inspect"})

FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```", re.M | re.S)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
SECTIONS = [name for name, tp in field_types(Config).items() if is_config_class(tp)]
KEY = re.compile(rf"(?<![\w./${{-])(?:{'|'.join(SECTIONS)})\.[A-Za-z_][\w.]*")
# What may stand before `vlm-fsdp` on a command line: a prompt, `uv run`, `pixi run`.
PREFIX = re.compile(r"^(?:\$ )?(?:(?:uv|pixi) run (?:--[\w-]+ )*)?(?=vlm-fsdp(?:\s|$))")


def code(markdown: str) -> tuple[list[tuple[str, str]], list[str]]:
    """Fenced blocks as (language, body) and the inline code spans outside them."""
    blocks = [(m["lang"], m["body"]) for m in FENCE.finditer(markdown)]
    inline = INLINE.findall(FENCE.sub("", markdown))
    return blocks, inline


def config_keys(markdown: str) -> set[str]:
    """Every dotted `section.key` spelled in the page's code."""
    blocks, inline = code(markdown)
    return {m.rstrip(".") for text in [*inline, *(body for _, body in blocks)] for m in KEY.findall(text)}


def split_command(line: str) -> list[str] | None:
    """The words of a `vlm-fsdp ...` line up to the first shell operator, or None for any other line."""
    line = PREFIX.sub("", line.strip())
    if not re.match(r"vlm-fsdp(\s|$)", line):
        return None
    lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;<>")
    lexer.whitespace_split = True
    words = []
    for word in lexer:
        if set(word) <= set("|&;<>"):
            break
        words.append(word)
    return words


def commands(markdown: str) -> Iterator[tuple[list[str], bool]]:
    """Every `vlm-fsdp ...` command in the page's code, as (words, runnable). Lines of fenced blocks (with
    continuation lines joined) and `{{ vlm-fsdp ... }}` embed lines are runnable commands; inline code spans
    are mentions, which may leave out required arguments."""
    blocks, inline = code(markdown)
    lines = [(line, False) for line in inline]
    for _, body in blocks:
        lines += [(line, True) for line in body.replace("\\\n", " ").splitlines()]
    lines += [(m.group(1), True) for m in EMBED.finditer(markdown)]
    for line, runnable in lines:
        words = split_command(line)
        if words is not None:
            yield words, runnable


def world_size(args: argparse.Namespace) -> int | None:
    """GPUs of the run a parsed command describes, where it says."""
    if hasattr(args, "nodes"):
        return args.nodes * args.gpus_per_node
    if hasattr(args, "nnodes"):
        return args.nnodes * args.nproc_per_node
    return getattr(args, "gpus", None)


def mention_problem(words: list[str], parser: argparse.ArgumentParser) -> str | None:
    """Why a mentioned command does not exist: an unknown (sub)command name or option."""
    depth = 1
    while depth < len(words) and words[depth] in subparsers(parser):
        parser = subparsers(parser)[words[depth]]
        depth += 1
    if depth < len(words) and subparsers(parser) and not words[depth].startswith("-"):
        return f"`{shlex.join(words)}`: no such vlm-fsdp command"
    for word in words[depth:]:
        option = word.split("=", 1)[0]
        if option.startswith("-") and option not in parser._option_string_actions:
            return f"`{shlex.join(words)}`: {shlex.join(words[:depth])} has no option {option}"
    return None


def command_problem(words: list[str], root: Path, runnable: bool = True) -> str | None:
    """Why a documented command would fail before it starts (for a mention: why it does not exist), or None."""
    shown = shlex.join(words)
    parser = build_parser()
    if len(words) > 1 and not words[1].startswith("-") and words[1] not in subparsers(parser):
        return None if words[1] in EXTERNAL_COMMANDS else f"`{shown}`: no such vlm-fsdp command"
    if not runnable:
        return mention_problem(words, parser)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = parser.parse_args(words[1:])
    except SystemExit as exit_:
        if exit_.code == 0:  # --help
            return None
        return f"`{shown}`: {err.getvalue().strip().splitlines()[-1]}"
    if hasattr(args, "recipe") and hasattr(args, "overrides"):
        config_file = root / args.config_file if args.config_file else None
        try:
            load_config(args.recipe, config_file=config_file, overrides=args.overrides, world_size=world_size(args))
        except UserError as error:
            return f"`{shown}`: {' '.join(str(error).split())}"
    return None


def unchecked_commands(markdown: str) -> list[str]:
    """Documented commands of EXTERNAL_COMMANDS that no installed package registers, so that went unchecked."""
    registered = subparsers(build_parser())
    found = [shlex.join(w) for w, _ in commands(markdown) if len(w) > 1 and w[1] in EXTERNAL_COMMANDS]
    return sorted({c for c in found if c.split()[1] not in registered})


def problems(markdown: str, root: Path) -> list[str]:
    """Every config key, YAML config block and command of a page that does not match the code."""
    known = set(all_keys(Config))
    out = [f"`{key}` is not a config key" for key in sorted(config_keys(markdown) - known)]
    blocks, _ = code(markdown)
    for lang, body in blocks:
        if lang == "yaml":
            try:
                apply_mapping(Config(), yaml.safe_load(body) or {})
            except UserError as error:
                out.append(f"YAML block is not a valid config file: {error}")
    out += [p for words, runnable in commands(markdown) if (p := command_problem(words, root, runnable))]
    return out
