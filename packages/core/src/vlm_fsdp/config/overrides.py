"""Apply YAML mappings and dotted `section.key=value` overrides onto a Config, with helpful errors."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterator, Mapping
from typing import Any

import yaml
from vlm_fsdp.config.fields import check_value, field_types, is_config_class
from vlm_fsdp.errors import ConfigError


def all_keys(cls: type, prefix: str = "") -> Iterator[str]:
    """Every dotted key of a config class, leaves and sections."""
    for name, tp in field_types(cls).items():
        key = f"{prefix}{name}"
        yield key
        if is_config_class(tp):
            yield from all_keys(tp, f"{key}.")


def suggest(key: str, root: type) -> str:
    """' Did you mean ...?' naming the closest valid dotted keys (whole key or same-looking last part), or ''."""
    keys = list(all_keys(root))
    leaves = {k: k.rsplit(".", 1)[-1] for k in keys}
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    near_leaves = set(difflib.get_close_matches(key.rsplit(".", 1)[-1], set(leaves.values()), n=3, cutoff=0.75))
    close += [k for k in keys if leaves[k] in near_leaves and k not in close]
    return f" Did you mean {' or '.join(close[:3])}?" if close else ""


def apply_mapping(config: Any, mapping: Mapping[str, Any], prefix: str = "") -> None:
    """Set every entry of a (nested) mapping on the config, checking names and types."""
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {mapping!r}")
    for name, value in mapping.items():
        set_key(config, f"{prefix}{name}", value)


def set_key(config: Any, key: str, value: Any) -> None:
    """Set one dotted key (`model.seq_length`) to a value, checked against the field's type."""
    node = config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        types = field_types(type(node))
        path = ".".join(parts[: depth + 1])
        if part not in types:
            hint = suggest(key, type(config)) or suggest(path, type(config))
            raise ConfigError(f"unknown config key '{key}'.{hint}")
        tp = types[part]
        if depth < len(parts) - 1:
            if not is_config_class(tp):
                raise ConfigError(f"'{path}' is a value, not a section; it has no key '{parts[depth + 1]}'")
            node = getattr(node, part)
            continue
        if is_config_class(tp):
            apply_mapping(config, value, prefix=f"{path}.")
        else:
            setattr(node, part, check_value(path, tp, value))


def parse_override(text: str) -> tuple[str, Any]:
    """Split `section.key=value`; the value is read as YAML (`8192`, `true`, `null`, `[8, 16]`, strings)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or " " in key:
        raise ConfigError(f"override '{text}' is not of the form section.key=value (e.g. model.seq_length=8192)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': the value is not valid YAML ({err.problem})") from None
    return key.strip(), value


def to_dict(config: Any) -> dict[str, Any]:
    """A plain nested dict of a config (for YAML and JSON)."""
    return dataclasses.asdict(config)
