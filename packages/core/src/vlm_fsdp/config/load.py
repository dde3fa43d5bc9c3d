"""Build a run's config: recipe function < `--config-file` YAML < dotted command-line overrides."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import yaml
from vlm_fsdp.config.fields import shorten
from vlm_fsdp.config.megatron_fsdp import resolve
from vlm_fsdp.config.overrides import (
    FILE_WHITESPACE,
    apply_mapping,
    load_yaml,
    parse_override,
    refuse_control_characters,
    set_key,
    to_dict,
)
from vlm_fsdp.config.recipes import load_recipe
from vlm_fsdp.config.run import Config
from vlm_fsdp.config.validate import validate
from vlm_fsdp.errors import ConfigError

# A config file holds a few sections of overrides: a few kilobytes.
MAX_CONFIG_FILE_BYTES = 1 << 20


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
    """The mapping of sections a config file holds."""
    source = f"config file {shorten(str(path))}"
    data = load_yaml(read_text(Path(path), source), source)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a mapping of sections (model:, train:, ...), got {shorten(data)}")
    data.pop("provenance", None)  # a saved run's config.yaml can be passed back in
    return data


def read_text(path: Path, source: str) -> str:
    """The text of a UTF-8 file of at most MAX_CONFIG_FILE_BYTES without control characters (tabs and line ends
    aside), or a ConfigError that says which of these it is not."""
    refuse_control_characters(str(path), f"the name of {source}")
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(f"{source} does not exist") from None
    except OSError as err:
        raise ConfigError(f"cannot read {source}: {err.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{source} is not a regular file")
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_CONFIG_FILE_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"cannot read {source}: {err.strerror}") from None
    if len(raw) > MAX_CONFIG_FILE_BYTES:
        raise ConfigError(f"{source} is larger than {MAX_CONFIG_FILE_BYTES >> 20} MiB: a config file is a few KiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{source} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start:,}); save it as UTF-8"
        ) from None
    text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
    refuse_control_characters(text, source, allowed=FILE_WHITESPACE)
    return text


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
