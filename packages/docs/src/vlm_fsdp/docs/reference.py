"""Reference pages written from the code at build time: config keys, recipes and the command line.

Each function returns one Markdown page; PAGES maps the page's path under docs/ to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import typing
from collections.abc import Callable, Iterator
from typing import Any

from vlm_fsdp.cli.main import build_parser
from vlm_fsdp.config.fields import Length, Range, field_docs, field_hints, field_types, is_config_class, type_name
from vlm_fsdp.config.megatron_fsdp import DEFAULTS
from vlm_fsdp.config.recipes import load_recipe, recipe_names, recipe_summary
from vlm_fsdp.config.run import Config
from vlm_fsdp.plan.params import count_params

# Width of the `--help` text on the command-line page.
HELP_WIDTH = 100


def bounds(tp: Any) -> str:
    """The declared bounds anywhere in a field's annotation, as text ('1 <= value <= 1,024'), or ''."""
    found = []

    def walk(t: Any) -> None:
        for arg in typing.get_args(t):
            if isinstance(arg, Range):
                found.append(arg.describe())
            elif isinstance(arg, Length):
                count = f"exactly {arg.min}" if arg.min == arg.max else f"{arg.min} to {arg.max:,}"
                found.append(f"{count} {arg.what}")
            else:
                walk(arg)

    walk(tp)
    return "; ".join(found)


def value(v: Any) -> str:
    """A value as it is written in YAML and in command-line overrides."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(value(x) for x in v) + "]"
    return str(v)


def cell(text: str) -> str:
    """Text that is safe inside a Markdown table cell: pipes escaped, except inside code spans, which the table
    parser leaves whole (and where a backslash would show)."""
    parts = text.split("`")
    return "`".join(part if i % 2 else part.replace("|", "\\|") for i, part in enumerate(parts))


def field_default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def sections(cls: type = Config, prefix: str = "") -> Iterator[tuple[str, type]]:
    """Every config class below `cls` with its dotted key, parents before their nested sections."""
    for name, tp in field_types(cls).items():
        if is_config_class(tp):
            yield f"{prefix}{name}", tp
            yield from sections(tp, f"{prefix}{name}.")


def config_reference() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Every key of a run's config, generated from the config classes: its type, its default and the",
        "docstring written under it. Set keys in a `--config-file` YAML file by section, or on the command line",
        "as dotted overrides (`model.seq_length=8192`); `vlm-fsdp config` prints the resolved result.",
        "",
        "A default of `null` that the Megatron-FSDP switch (`dist.use_megatron_fsdp`) decides is shown with both",
        "of its values. Combinations that cannot work are rejected when the config is loaded, with the reason.",
    ]
    for key, cls in [("", Config), *sections()]:
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        heading = f"`{key}` {{#{key.replace('.', '-')}}}" if key else "Top level {#top-level}"
        lines += ["", f"## {heading}", "", summary, ""]
        lines += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
        docs, types, hints = field_docs(cls), field_types(cls), field_hints(cls)
        for field in dataclasses.fields(cls):
            full, tp = f"{key}.{field.name}" if key else field.name, types[field.name]
            if is_config_class(tp):
                default = f"see [`{full}`](#{full.replace('.', '-')})"
                shown = tp.__name__
            else:
                default = f"`{value(field_default(field))}`"
                shown = type_name(tp) + (f" ({bounds(hints[field.name])})" if bounds(hints[field.name]) else "")
                if (key, field.name) in DEFAULTS:
                    default += f": `{value(DEFAULTS[key, field.name])}` with Megatron-FSDP"
            lines.append(f"| `{full}` | {cell(shown)} | {cell(default)} | {cell(docs.get(field.name, ''))} |")
    return "\n".join(lines) + "\n"


def recipes_reference() -> str:
    names = recipe_names()
    lines = [
        "# Recipes",
        "",
        "Every installed recipe, generated from the recipe functions (`vlm-fsdp recipes` lists the same).",
        "Start a run from one with `--recipe NAME`; the YAML files in `recipes/` add the Megatron-FSDP",
        "settings of the full-size runs on top.",
        "",
        "| recipe | parameters | active per token | summary |",
        "| --- | --- | --- | --- |",
    ]
    configs = {name: load_recipe(name) for name in names}
    counts = {name: count_params(config.model) for name, config in configs.items()}
    for name in names:
        c = counts[name]
        lines.append(
            f"| [`{name}`](#{name}) | {c.total / 1e9:.2f} B | {c.active / 1e9:.2f} B | {recipe_summary(name)} |"
        )
    for name, config in configs.items():
        m, v, t, c = config.model, config.model.vision, config.train, counts[name]
        rows = [
            ("decoder layers", m.num_layers),
            ("hidden size", m.hidden_size),
            (
                "attention heads / key-value groups / head width",
                f"{m.num_attention_heads} / {m.num_query_groups} / {m.kv_channels}",
            ),
            ("experts per layer (routed to per token)", f"{m.num_moe_experts} (top-{m.moe_router_topk})"),
            ("expert MLP width", m.moe_ffn_hidden_size),
            ("vocabulary", m.vocab_size),
            ("vision tower: blocks / width / heads", f"{v.depth} / {v.hidden_size} / {v.num_heads}"),
            ("DeepStack vision blocks", value(v.deepstack_visual_indexes)),
            ("parameters: total / active", f"{c.total:,} / {c.active:,}"),
            ("parameters: vision / experts / embeddings", f"{c.vision:,} / {c.experts:,} / {c.embeddings:,}"),
            ("sequence length", m.seq_length),
            ("global batch / micro batch / steps", f"{t.global_batch_size} / {t.micro_batch_size} / {t.train_iters}"),
            (
                "learning rate (peak / final, warm-up steps)",
                f"{config.optimizer.lr:g} / {config.optimizer.min_lr:g}, {config.optimizer.lr_warmup_iters}",
            ),
            (
                "data",
                "bundled text-only data" if config.data.text_only else (config.data.path or "bundled image-text data"),
            ),
        ]
        lines += ["", f"## `{name}` {{#{name}}}", "", recipe_summary(name), "", "| | |", "| --- | --- |"]
        lines += [f"| {label} | {cell(str(val))} |" for label, val in rows]
    return "\n".join(lines) + "\n"


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommands of a parser by name."""
    return {
        name: sub
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name, sub in action.choices.items()
    }


def commands(
    parser: argparse.ArgumentParser, words: tuple[str, ...] = ()
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every subcommand of a parser, nested ones included, as ('convert hf-to-fsdp', its parser)."""
    for name, sub in subparsers(parser).items():
        yield " ".join((*words, name)), sub
        yield from commands(sub, (*words, name))


def help_text(parser: argparse.ArgumentParser) -> str:
    """`--help` of a parser at a fixed width (argparse otherwise follows the terminal it runs in)."""
    parser.formatter_class = functools.partial(parser.formatter_class, width=HELP_WIDTH)
    return parser.format_help()


def cli_reference() -> str:
    parser = build_parser()
    lines = [
        "# Command line",
        "",
        "The `--help` of `vlm-fsdp` and of every subcommand, generated from the argument parsers.",
        "",
        "```text",
        help_text(parser).rstrip(),
        "```",
    ]
    for name, sub in commands(parser):
        anchor = name.replace(" ", "-")
        lines += ["", f"## `vlm-fsdp {name}` {{#{anchor}}}", "", "```text", help_text(sub).rstrip(), "```"]
    return "\n".join(lines) + "\n"


PAGES: dict[str, Callable[[], str]] = {
    "reference/config.md": config_reference,
    "reference/recipes.md": recipes_reference,
    "reference/cli.md": cli_reference,
}
