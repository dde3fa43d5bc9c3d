"""Property-based tests of bad config input, through the command line as a user meets it: generated overrides
and config files that are out of range, of the wrong type, unsafe YAML (tags, duplicate keys, alias bombs, deep
nesting), binary or non-UTF-8, huge or not finite. `vlm-fsdp plan` and `vlm-fsdp config` must answer each with
exit status 2 and one short error line, never a traceback or a hang; and configs within the bounds still plan.

Examples are derived from a fixed seed (`derandomize=True`), so every run tests the same inputs.
"""

from __future__ import annotations

import contextlib
import math
import signal
import types
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from vlm_fsdp.cli.main import main
from vlm_fsdp.config.fields import Range, check_value, field_hints, field_types, is_config_class
from vlm_fsdp.config.overrides import load_yaml
from vlm_fsdp.config.run import Config
from vlm_fsdp.errors import ConfigError

# Longest error line accepted: a message names the key, a shortened value and the allowed range.
MAX_ERROR_CHARS = 600
# Seconds one command may take before it counts as a hang.
HANG_SECONDS = 10


def fuzz(examples: int) -> settings:
    return settings(
        derandomize=True,
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


@contextlib.contextmanager
def within_seconds(seconds: int) -> Iterator[None]:
    """Fail, instead of waiting forever, when the block runs longer than `seconds`."""

    def hang(signum: int, frame: object) -> None:
        raise AssertionError(f"no answer within {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run(capsys: pytest.CaptureFixture, argv: list[str]) -> tuple[int, str, str]:
    with within_seconds(HANG_SECONDS):
        code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(capsys: pytest.CaptureFixture, args: list[str]) -> None:
    """`plan` and `config` both exit 2 with one short error line and print nothing else."""
    for command in ("plan", "config"):
        code, out, err = run(capsys, [command, *args])
        assert code == 2, f"{command} accepted {args!r}:\n{out[-500:]}"
        assert out == ""
        assert_one_error_line(command, err)


def assert_one_error_line(command: str, err: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"vlm-fsdp {command}: error: "), err
    assert len(lines[0]) <= MAX_ERROR_CHARS, lines[0][:MAX_ERROR_CHARS]
    assert "Traceback" not in err and "\x1b" not in err


def assert_clean(capsys: pytest.CaptureFixture, args: list[str]) -> None:
    """Whatever the input, `plan` either plans (exit 0 or 1) or refuses it with one line (exit 2)."""
    code, out, err = run(capsys, ["plan", *args])
    if code == 2:
        assert_one_error_line("plan", err)
    else:
        assert code in (0, 1) and "Verdict:" in out and err == ""


# --- what the config classes declare ----------------------------------------------------------------------


def leaves(cls: type = Config, prefix: str = "") -> Iterator[tuple[str, typing.Any]]:
    """(dotted key, annotation with bounds) of every value field."""
    for name, hint in field_hints(cls).items():
        if is_config_class(hint):
            yield from leaves(hint, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", hint


def number_rule(hint: typing.Any) -> tuple[type, Range, str] | None:
    """(int or float, its Range, YAML template with `{}` where the number goes) of a field holding numbers."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        base, *rules = args
        ranges = [r for r in rules if isinstance(r, Range)]
        if base in (int, float) and ranges:
            return base, ranges[0], "{}"
        return number_rule(base)
    if origin is list:
        inner = number_rule(args[0])
        return None if inner is None else (inner[0], inner[1], "[" + inner[2] + "]")
    if origin in (typing.Union, types.UnionType):
        found = [number_rule(a) for a in args if a is not type(None)]
        return found[0] if found else None
    return None


BOUNDED = [(key, *rule) for key, hint in leaves() if (rule := number_rule(hint))]
KEYS = [key for key, _ in leaves()]


def plain_type(key: str) -> typing.Any:
    """The annotation of a dotted key without its bounds."""
    cls, parts = Config, key.split(".")
    for part in parts[:-1]:
        cls = field_types(cls)[part]
    return field_types(cls)[parts[-1]]


def holds_numbers(tp: typing.Any) -> bool:
    return tp in (int, float) or any(holds_numbers(arg) for arg in typing.get_args(tp))


# YAML values, of which each field's type accepts few.
VALUE_POOL = ["1", "-1", "1.5", "true", "null", "abc", "[1]", "[[1, 2]]", "{a: 1}", "''", "[a]", "2024-01-01"]


def mismatches(key: str) -> list[str]:
    """Values of VALUE_POOL the field's type does not take."""
    tp, bad = plain_type(key), []
    for text in VALUE_POOL:
        try:
            check_value(key, tp, load_yaml(text, "a test value"))
        except ConfigError:
            bad.append(text)
    return bad


WRONG_TYPES = [(key, text) for key in KEYS for text in mismatches(key)]


def yaml_number(value: float) -> str:
    """A number as YAML 1.1 reads it back as the same number (1.0e-05, not 1e-05, which it reads as text)."""
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else ".inf" if value > 0 else "-.inf"
    return yaml.safe_dump(value).removesuffix("...\n").strip()


def as_file(key: str, text: str) -> str:
    """A config file that sets one dotted key to a YAML value."""
    *sections, name = key.split(".")
    lines = [f"{'  ' * depth}{section}:" for depth, section in enumerate(sections)]
    return "\n".join([*lines, f"{'  ' * len(sections)}{name}: {text}"]) + "\n"


# --- strategies -------------------------------------------------------------------------------------------


@st.composite
def out_of_range(draw: st.DrawFn) -> tuple[str, str]:
    """(dotted key, YAML value) with a number below or above the field's declared range, or not finite."""
    key, kind, bounds, template = draw(st.sampled_from(BOUNDED))
    options = []
    low = bounds.ge if bounds.ge is not None else bounds.gt
    high = bounds.le if bounds.le is not None else bounds.lt
    step = st.integers(1, 10**40) if kind is int else st.floats(1e-6, 1e40)
    if low is not None:
        options.append(step.map(lambda d: low - d))
    if high is not None:
        options.append(step.map(lambda d: high + d))
    options += [st.just(edge) for edge in (bounds.gt, bounds.lt) if edge is not None]
    if kind is float:
        options.append(st.sampled_from([math.nan, math.inf, -math.inf]))
    value = draw(st.one_of(options))
    value = int(value) if kind is int else value
    assert not math.isfinite(value) or bounds.broken(value), (key, value)
    return key, template.format(yaml_number(value))


@st.composite
def huge_number(draw: st.DrawFn) -> tuple[str, str]:
    """(dotted key, YAML value) with an integer of 25 to 9,000 digits for a field bounded above."""
    key, _, _, template = draw(st.sampled_from([b for b in BOUNDED if b[2].le is not None or b[2].lt is not None]))
    digits = draw(st.integers(25, 9000))
    sign = draw(st.sampled_from(["", "-"]))
    return key, template.format(sign + "9" * digits)


CONTROL = st.sampled_from([*map(chr, range(0x20)), "\x7f", "\x85", "\u200b", "\u202e", "\u2066", "\ufeff", "\udcff"])
TAGS = st.sampled_from(
    [
        *("!!bool", "!!int", "!!str", "!!float", "!!binary", "!!set", "!!omap", "!!timestamp", "!custom", "!"),
        *("!!python/object/apply:os.system", "!!python/name:builtins.eval", "!<tag:yaml.org,2002:int>"),
    ]
)
UNCLOSED = st.sampled_from(["[", "{", "[1, [2", "{a: [1}", '"abc', "'abc"])


@st.composite
def alias_bomb(draw: st.DrawFn, *, flow: bool) -> str:
    """Anchors that each repeat the one before: width ** levels values from a few hundred bytes."""
    width = draw(st.integers(3, 12))
    levels = draw(st.integers(math.ceil(math.log(10_001, width)), 12))
    if flow:
        parts = ["&a0 [" + ", ".join(["lol"] * width) + "]"]
        parts += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
        return "[" + ", ".join(parts) + "]"
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@st.composite
def deep_nesting(draw: st.DrawFn) -> str:
    depth = draw(st.integers(11, 3000))
    if draw(st.booleans()):
        return "[" * depth + "]" * depth
    return "{a: " * depth + "1" + "}" * depth


@st.composite
def unsafe_override(draw: st.DrawFn) -> str:
    """An override whose value (or key) no config takes: tags, control characters, bombs, nesting, duplicates,
    unclosed brackets, megabytes."""
    key = draw(st.sampled_from(KEYS))
    plain = draw(st.text(st.characters(codec="ascii", categories=["L", "N"]), max_size=20))
    kind = draw(st.sampled_from(["tag", "control", "control key", "bomb", "deep", "duplicate", "unclosed", "long"]))
    if kind == "tag":
        return f"{key}={draw(TAGS)} {plain or 1}"
    if kind == "control":
        at = draw(st.integers(0, len(plain)))
        return f"{key}={plain[:at]}{draw(CONTROL)}{plain[at:]}"
    if kind == "control key":
        return f"{key}{draw(CONTROL)}=1"
    if kind == "bomb":
        return f"{key}={draw(alias_bomb(flow=True))}"
    if kind == "deep":
        return f"{key}={draw(deep_nesting())}"
    if kind == "duplicate":
        return f"{key}={{{plain or 'a'}: 1, {plain or 'a'}: 2}}"
    if kind == "unclosed":
        return f"{key}={draw(UNCLOSED)}"
    return f"{key}={'x' * draw(st.integers(10_001, 200_000))}"


@st.composite
def duplicate_key_file(draw: st.DrawFn) -> str:
    """A config file of real keys in which a section or a value appears twice."""
    keys = draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=5))
    doubled = draw(st.sampled_from(keys))
    if draw(st.booleans()):  # a whole section again, as in two `model:` blocks
        return "".join(as_file(key, "null") for key in [*keys, doubled])
    lines = as_file(doubled, "1").splitlines()
    return "\n".join([*lines, lines[-1]]) + "\n"  # the same value twice in its section


def invalid_utf8(data: bytes) -> bytes:
    """`data` with a byte that cannot start or continue a UTF-8 sequence."""
    return data + b"\xff"


# --- the properties ---------------------------------------------------------------------------------------


@fuzz(40)
@given(out_of_range())
def test_out_of_range_numbers_are_refused(capsys, case):
    key, text = case
    assert_refused(capsys, [f"{key}={text}"])


@fuzz(25)
@given(st.sampled_from(WRONG_TYPES))
def test_values_of_the_wrong_type_are_refused(capsys, case):
    key, text = case
    assert_refused(capsys, [f"{key}={text}"])


@fuzz(15)
@given(huge_number())
def test_huge_numbers_are_refused_in_one_short_line(capsys, case):
    key, text = case
    assert_refused(capsys, [f"{key}={text}"])


@fuzz(40)
@given(unsafe_override())
def test_unsafe_overrides_are_refused(capsys, override):
    assert_refused(capsys, [override])


@fuzz(15)
@given(st.text(max_size=60), st.sampled_from(KEYS))
def test_any_text_as_a_value_plans_or_is_refused_in_one_line(capsys, text, key):
    assert_clean(capsys, [f"{key}={text}"])


@fuzz(15)
@given(st.from_regex(r"[a-z_]{1,12}(\.[a-z_]{1,16}){0,2}", fullmatch=True))
def test_unknown_keys_are_refused(capsys, key):
    assume(key not in KEYS)
    assert_refused(capsys, [f"{key}=1"])


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def write(folder: Path, content: str | bytes) -> str:
    path = folder / "config.yaml"
    path.write_bytes(content.encode("utf-8", "surrogatepass") if isinstance(content, str) else content)
    return str(path)


@fuzz(25)
@given(st.one_of(out_of_range(), huge_number(), st.sampled_from(WRONG_TYPES)))
def test_config_files_with_bad_values_are_refused(capsys, folder, case):
    key, text = case
    assert_refused(capsys, ["--config-file", write(folder, as_file(key, text))])


@fuzz(30)
@given(
    st.one_of(
        duplicate_key_file(),
        alias_bomb(flow=False),
        deep_nesting().map(lambda text: f"model:\n  mrope_section: {text}\n"),
        st.binary(max_size=200).map(invalid_utf8),
        st.tuples(st.sampled_from(KEYS), CONTROL).map(lambda kc: as_file(kc[0], f"a{kc[1]}b")),
        st.tuples(st.sampled_from(KEYS), TAGS).map(lambda kt: as_file(kt[0], f"{kt[1]} 1")),
        st.sampled_from(["- 1\n", "1\n", "abc\n", "[model]\n", "model: 5\n", "model: [1]\n", "? [a]\n: 1\n"]),
    )
)
def test_unsafe_config_files_are_refused(capsys, folder, content):
    assert_refused(capsys, ["--config-file", write(folder, content)])


@fuzz(15)
@given(st.binary(max_size=300))
def test_any_bytes_as_a_config_file_plan_or_are_refused_in_one_line(capsys, folder, content):
    assert_clean(capsys, ["--config-file", write(folder, content)])


# Fields that other fields do not constrain, so that any value in their bounds keeps the tiny recipe valid.
INDEPENDENT = [
    "train.seed",
    "train.eval_iters",
    "train.eval_interval",
    "train.max_bad_steps",
    "logger.log_interval",
    "checkpoint.most_recent_k",
    "checkpoint.save_interval",
    "data.num_workers",
    "data.prefetch_factor",
    "data.packing_window",
    "data.timeout_seconds",
    "dist.distributed_timeout_minutes",
    "optimizer.adam_beta1",
    "optimizer.adam_beta2",
    "optimizer.adam_eps",
    "optimizer.weight_decay",
    "optimizer.clip_grad",
    "model.moe_aux_loss_coeff",
    "model.norm_epsilon",
    "model.rotary_base",
]


@st.composite
def in_range(draw: st.DrawFn) -> tuple[str, float]:
    key, kind, bounds, _ = draw(st.sampled_from([b for b in BOUNDED if b[0] in INDEPENDENT]))
    if kind is int:
        return key, draw(st.integers(int(bounds.ge), int(bounds.le)))
    value = draw(
        st.floats(
            min_value=bounds.ge if bounds.ge is not None else bounds.gt,
            max_value=bounds.le if bounds.le is not None else bounds.lt if bounds.lt is not None else 1e30,
            exclude_min=bounds.gt is not None,
            exclude_max=bounds.lt is not None,
            allow_nan=False,
        )
    )
    return key, value


@fuzz(20)
@given(st.lists(in_range(), min_size=1, max_size=4, unique_by=lambda kv: kv[0]))
def test_values_within_the_bounds_still_plan(capsys, cases):
    overrides = [f"{key}={yaml_number(value)}" for key, value in cases]
    code, out, err = run(capsys, ["plan", *overrides])
    assert (code, err) == (0, ""), err
    assert "Verdict: FITS" in out
    code, out, _ = run(capsys, ["config", *overrides])
    resolved = yaml.safe_load(out)
    for key, value in cases:
        section, *rest = key.split(".")
        assert resolved[section][rest[0]] == value


def test_every_numeric_field_is_fuzzed():
    """The strategies reach every field that holds numbers: each declares a Range they read."""
    numeric = {key for key in KEYS if holds_numbers(plain_type(key))}
    assert numeric == {key for key, *_ in BOUNDED}


def just_outside(kind: type, bounds: Range) -> list[float]:
    """The numbers nearest to each end of a range that it does not take."""
    gap = 1 if kind is int else 1e-3
    return [
        *([bounds.ge - gap] if bounds.ge is not None else []),
        *([bounds.gt] if bounds.gt is not None else []),
        *([bounds.le + max(gap, abs(bounds.le) * 1e-3)] if bounds.le is not None else []),
        *([bounds.lt] if bounds.lt is not None else []),
    ]


@pytest.mark.parametrize(("key", "kind", "bounds", "template"), BOUNDED, ids=[b[0] for b in BOUNDED])
def test_every_bound_is_enforced(capsys, key, kind, bounds, template):
    for value in just_outside(kind, bounds):
        code, _, err = run(capsys, ["config", f"{key}={template.format(yaml_number(kind(value)))}"])
        assert code == 2 and key in err, (value, err)
