"""Find recipes by name through the `vlm_fsdp.recipes` entry-point group (the core imports no recipe package).

A recipe is a function that takes no arguments and returns a `Config`. A package of your own registers one with

    [project.entry-points."vlm_fsdp.recipes"]
    my_recipe = "my_package.recipes:my_recipe"
"""

from __future__ import annotations

import difflib
import inspect
import re
from importlib.metadata import entry_points

from vlm_fsdp.config.fields import shorten
from vlm_fsdp.config.run import Config
from vlm_fsdp.errors import ConfigError

GROUP = "vlm_fsdp.recipes"
DEFAULT_RECIPE = "tiny"


def recipe_names() -> list[str]:
    """Names of every installed recipe, sorted."""
    return sorted({ep.name for ep in entry_points(group=GROUP)})


def load_recipe(name: str) -> Config:
    """Build the named recipe's config."""
    found = [ep for ep in entry_points(group=GROUP) if ep.name == name]
    if not found:
        names = recipe_names()
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5) if len(name) <= 200 else []
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise ConfigError(f"unknown recipe {shorten(name)}.{hint} Installed recipes: {', '.join(names) or 'none'}")
    config = found[0].load()()
    if not isinstance(config, Config):
        raise ConfigError(f"recipe '{name}' ({found[0].value}) returned {type(config).__name__}, not a Config")
    config.recipe = name
    return config


def recipe_summary(name: str) -> str:
    """The first paragraph of a recipe function's docstring, on one line."""
    (ep,) = [ep for ep in entry_points(group=GROUP) if ep.name == name][:1]
    doc = inspect.cleandoc(ep.load().__doc__ or "")
    return " ".join(re.split(r"\n\s*\n", doc, maxsplit=1)[0].split())
