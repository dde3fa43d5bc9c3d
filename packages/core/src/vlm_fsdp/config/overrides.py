"""Read YAML safely and apply YAML mappings and dotted `section.key=value` overrides onto a Config, with errors
that say what is wrong and how to fix it.

YAML (config files and override values) is read by a bounded loader that refuses what a config never needs and
what can hang or flood a run: tags (`!!bool 1`, `!!python/...`), duplicate keys, nesting deeper than
MAX_YAML_DEPTH, more than MAX_YAML_NODES values (counting what anchors and aliases expand to), integers longer
than MAX_INT_DIGITS and control characters.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import yaml
from vlm_fsdp.config.fields import (
    check_value,
    control_character,
    describe_character,
    field_types,
    is_config_class,
    shorten,
)
from vlm_fsdp.errors import ConfigError

MAX_YAML_DEPTH = 10
MAX_YAML_NODES = 10_000
MAX_INT_DIGITS = 100
MAX_OVERRIDE_CHARS = 10_000
# Keys longer than this get no suggestions (difflib's time grows with the product of the lengths).
MAX_SUGGESTED_KEY_CHARS = 200
# Characters a config file may hold besides printable ones.
FILE_WHITESPACE = "\t\n\r"


class _Refused(yaml.MarkedYAMLError):
    """YAML that parses but that a config never needs (the loader's own refusals)."""

    def __init__(self, problem: str, mark: yaml.Mark | None) -> None:
        super().__init__(problem=problem, problem_mark=mark)


class BoundedLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader without tags, duplicate keys, dates (they stay strings), deep nesting, more than
    MAX_YAML_NODES nodes and integers longer than MAX_INT_DIGITS."""

    yaml_implicit_resolvers: ClassVar[dict[str, list]] = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0
        self.nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        tag = getattr(event, "tag", None)
        if tag is not None:
            shown = shorten(tag.replace("tag:yaml.org,2002:", "!!"), 40)
            raise _Refused(f"YAML tags such as {shown} are not accepted: write the plain value", event.start_mark)
        self.nodes += 1
        if self.nodes > MAX_YAML_NODES:
            raise _Refused(f"more than {MAX_YAML_NODES:,} values: a config is far smaller", event.start_mark)
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise _Refused(f"nested deeper than {MAX_YAML_DEPTH} levels: a config is flatter", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            self.refuse_duplicate_keys(node)
        return super().construct_mapping(node, deep)

    def refuse_duplicate_keys(self, node: yaml.MappingNode) -> None:
        first: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            if key in first:
                raise _Refused(
                    f"duplicate key {shorten(key, 40)} (first at line {first[key].line + 1}): the second would "
                    "silently replace the first; merge them",
                    key_node.start_mark,
                )
            first[key] = key_node.start_mark

    def construct_bounded_int(self, node: yaml.ScalarNode) -> int:
        if len(node.value) > MAX_INT_DIGITS:
            raise _Refused(
                f"an integer of {len(node.value):,} digits is too large for any config value", node.start_mark
            )
        return self.construct_yaml_int(node)


BoundedLoader.add_constructor("tag:yaml.org,2002:int", BoundedLoader.construct_bounded_int)


def load_yaml(text: str, source: str, *, positions: bool = True) -> Any:
    """The value of a YAML document read with BoundedLoader; otherwise a ConfigError naming `source` and what is
    wrong (with `positions`, where: line and column)."""
    loader = BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        check_expansion(node)
        return loader.construct_document(node)
    except _Refused as err:
        raise ConfigError(f"{source}: {err.problem}{_where(err.problem_mark, positions)}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {_yaml_problem(err, positions)}") from None
    finally:
        loader.dispose()


def check_expansion(root: yaml.Node) -> None:
    """Refuse a node graph that aliases expand beyond MAX_YAML_NODES nodes or MAX_YAML_DEPTH levels, or that
    refers to itself (alias bombs: a few hundred bytes that expand to gigabytes)."""
    sizes: dict[int, tuple[int, int] | None] = {}  # id(node) -> (nodes, levels) below it; None while visiting

    def visit(node: yaml.Node, depth: int) -> tuple[int, int]:
        if id(node) in sizes:
            known = sizes[id(node)]
            if known is None:
                raise _Refused("an alias refers to a value that contains it", node.start_mark)
        else:
            if depth > MAX_YAML_DEPTH:  # before the children, so that a chain of aliases cannot recurse deeply
                raise _Refused(f"aliases expand deeper than {MAX_YAML_DEPTH} levels", node.start_mark)
            sizes[id(node)] = None
            below = [visit(child, depth + 1) for child in _children(node)]
            known = (1 + sum(n for n, _ in below), 1 + max((levels for _, levels in below), default=0))
            sizes[id(node)] = known
        if known[0] > MAX_YAML_NODES:
            raise _Refused(f"aliases expand to more than {MAX_YAML_NODES:,} values", node.start_mark)
        if depth + known[1] > MAX_YAML_DEPTH + 1:
            raise _Refused(f"aliases expand deeper than {MAX_YAML_DEPTH} levels", node.start_mark)
        return known

    visit(root, 1)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    return []


def _where(mark: yaml.Mark | None, positions: bool) -> str:
    return f" (line {mark.line + 1}, column {mark.column + 1})" if positions and mark is not None else ""


def _yaml_problem(err: yaml.YAMLError, positions: bool) -> str:
    """One short line for a YAML error (PyYAML's own message spans lines and quotes the text around it)."""
    if isinstance(err, yaml.MarkedYAMLError):
        problem = err.problem or err.context or "unreadable"
        mark = err.problem_mark or err.context_mark
        return " ".join(problem.split())[:200] + _where(mark, positions)
    return " ".join(str(err).split())[:200]


def refuse_control_characters(text: str, source: str, *, allowed: str = "") -> None:
    """ConfigError when `text` holds a control character (other than `allowed`), naming its place, not itself."""
    index = control_character(text, allowed)
    if index is None:
        return
    line = text.count("\n", 0, index) + 1
    column = index - (text.rfind("\n", 0, index) + 1) + 1
    where = f"line {line}, column {column}" if "\n" in allowed else f"character {index + 1}"
    raise ConfigError(
        f"{source} holds the control character {describe_character(text[index])} at {where} (terminal escape "
        "sequences, NUL and other invisible characters are not accepted); remove it"
    )


def parse_override(text: str) -> tuple[str, Any]:
    """Split `section.key=value`; the value is read as YAML (`8192`, `true`, `null`, `[8, 16]`, strings)."""
    source = f"override {shorten(text)}"
    if len(text) > MAX_OVERRIDE_CHARS:
        raise ConfigError(f"{source} is longer than {MAX_OVERRIDE_CHARS:,} characters")
    refuse_control_characters(text, source)
    key, sep, raw = text.partition("=")
    if not sep or not key or " " in key:
        raise ConfigError(f"{source} is not of the form section.key=value (e.g. model.seq_length=8192)")
    value = load_yaml(raw, source, positions=False) if raw.strip() else ""
    return key.strip(), value


# --- applying values --------------------------------------------------------------------------------------


def all_keys(cls: type, prefix: str = "") -> Iterator[str]:
    """Every dotted key of a config class, leaves and sections."""
    for name, tp in field_types(cls).items():
        key = f"{prefix}{name}"
        yield key
        if is_config_class(tp):
            yield from all_keys(tp, f"{key}.")


def suggest(key: str, root: type, *, sections: bool = True) -> str:
    """' Did you mean ...?' naming valid dotted keys (sections too, with `sections`): the same key in another
    section first (`model.seed` -> `train.seed`), then the closest spellings of the whole key and of its last
    part; or ''."""
    if len(key) > MAX_SUGGESTED_KEY_CHARS:
        return ""
    keys = [
        k
        for k in all_keys(root)
        if not key.startswith(f"{k}.") and (sections or not _is_section(root, k))  # not the sections it is in
    ]
    leaf = key.rsplit(".", 1)[-1]
    leaves = {k: k.rsplit(".", 1)[-1] for k in keys}
    moved = [k for k in keys if leaves[k] == leaf and k != key]
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    near_leaves = set(difflib.get_close_matches(leaf, set(leaves.values()), n=3, cutoff=0.75))
    near = [k for k in keys if leaves[k] in near_leaves]
    found = list(dict.fromkeys(moved + close + near))[:3]
    return f" Did you mean {' or '.join(found)}?" if found else ""


def _is_section(root: type, key: str) -> bool:
    tp = root
    for part in key.split("."):
        tp = field_types(tp)[part]
    return is_config_class(tp)


def apply_mapping(config: Any, mapping: Mapping[str, Any], prefix: str = "") -> None:
    """Set every entry of a (nested) mapping on the config, checking names and types."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys (a section), got {shorten(mapping)}")
    for name, value in mapping.items():
        if not isinstance(name, str):
            raise ConfigError(f"{where}: keys are names, got {shorten(name)} ({type(name).__name__})")
        set_key(config, f"{prefix}{name}", value)


def set_key(config: Any, key: str, value: Any) -> None:
    """Set one dotted key (`model.seq_length`) to a value, checked against the field's type (its bounds are
    checked with the whole config, by `validate`)."""
    node = config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        types = field_types(type(node))
        path = ".".join(parts[: depth + 1])
        if part not in types:
            hint = suggest(key, type(config), sections=isinstance(value, Mapping)) or suggest(path, type(config))
            raise ConfigError(f"unknown config key {shorten(key)}.{hint}")
        tp = types[part]
        if depth < len(parts) - 1:
            if not is_config_class(tp):
                raise ConfigError(
                    f"{shorten(path)} is a value, not a section; it has no key {shorten(parts[depth + 1])}"
                )
            node = getattr(node, part)
            continue
        if is_config_class(tp):
            apply_mapping(config, value, prefix=f"{path}.")
        else:
            setattr(node, part, check_value(path, tp, value))


def to_dict(config: Any) -> dict[str, Any]:
    """A plain nested dict of a config (for YAML and JSON)."""
    return dataclasses.asdict(config)
