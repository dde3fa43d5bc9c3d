"""Build a run's config: recipe function < `--config-file` YAML < dotted command-line overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from vlm_fsdp.config.megatron_fsdp import resolve
from vlm_fsdp.config.overrides import apply_mapping, parse_override, set_key, to_dict
from vlm_fsdp.config.recipes import load_recipe
from vlm_fsdp.config.run import Config
from vlm_fsdp.config.validate import validate
from vlm_fsdp.errors import ConfigError


def load_config(
    recipe: str,
    *,
    config_file: str | Path | None = None,
    overrides: list[str] = (),
    world_size: int | None = None,
) -> Config:
    """The resolved, validated config of a run (on `world_size` GPUs, when given)."""
    config = load_recipe(recipe)
    if config_file is not None:
        apply_mapping(config, read_yaml(config_file))
    for text in overrides:
        set_key(config, *parse_override(text))
    config = resolve(config)
    validate(config, world_size)
    return config


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (model:, train:, ...)")
    data.pop("provenance", None)  # a saved run's config.yaml can be passed back in
    return data


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
