"""Property-based tests of the checkpoint tools on damaged, truncated, garbage and crafted files.

One tiny Hugging Face directory (random tensors of a small config, no model built) and its fsdp_dtensor checkpoint
are made once per module; each example damages a copy. Every run of `inspect` and `convert` must end with exit 0, or
with one clear message (exit 1 from `inspect` for a damaged checkpoint, exit 2 from the converters), never with a
traceback; no code from the files may run; nothing but the output may change or disappear; and a damaged checkpoint
that carries checksums is never reported complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from vlm_fsdp.cli.main import main
from vlm_fsdp.config import load_config
from vlm_fsdp.config.model import ModelConfig
from vlm_fsdp.model.hf_config import hf_config_dict
from vlm_fsdp.plan.params import vision_param_shapes

from tests.data.make_torch_dist import ODD, OVERRIDES
from tests.data.make_torch_dist import OUT as TORCH_DIST

SMALL = [
    "model.vocab_size=64",
    "model.image_token_id=60",
    "model.video_token_id=61",
    "model.vision_start_token_id=62",
    "model.vision_end_token_id=63",
    "model.hidden_size=32",
    "model.num_attention_heads=2",
    "model.num_query_groups=1",
    "model.kv_channels=16",
    "model.mrope_section=[4, 2, 2]",
    "model.num_moe_experts=2",
    "model.moe_ffn_hidden_size=8",
    "model.moe_router_topk=1",
    "model.num_layers=1",
    "model.ffn_hidden_size=16",
    "model.vision.depth=1",
    "model.vision.hidden_size=16",
    "model.vision.num_heads=1",
    "model.vision.intermediate_size=16",
    "model.vision.deepstack_visual_indexes=[0]",
    "model.vision.num_position_embeddings=16",
    "model.vision.patch_size=2",
]
FUZZ = settings(
    derandomize=True,
    max_examples=20,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- the module's one checkpoint ------------------------------------------------------------------------------


def hf_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Hugging Face Qwen3-VL-MoE model of this architecture, with its shape."""
    h, kv, experts, ffn = m.hidden_size, m.kv_channels, m.num_moe_experts, m.moe_ffn_hidden_size
    q, k = m.num_attention_heads * kv, m.num_query_groups * kv
    text = "model.language_model."
    shapes = {f"model.visual.{name}": shape for name, shape in vision_param_shapes(m).items()}
    shapes |= {f"{text}embed_tokens.weight": (m.vocab_size, h), f"{text}norm.weight": (h,)}
    for i in range(m.num_layers):
        layer = f"{text}layers.{i}."
        shapes |= {
            f"{layer}input_layernorm.weight": (h,),
            f"{layer}post_attention_layernorm.weight": (h,),
            f"{layer}self_attn.q_proj.weight": (q, h),
            f"{layer}self_attn.k_proj.weight": (k, h),
            f"{layer}self_attn.v_proj.weight": (k, h),
            f"{layer}self_attn.o_proj.weight": (h, q),
            f"{layer}self_attn.q_norm.weight": (kv,),
            f"{layer}self_attn.k_norm.weight": (kv,),
            f"{layer}mlp.gate.weight": (experts, h),
            f"{layer}mlp.experts.gate_up_proj": (experts, 2 * ffn, h),
            f"{layer}mlp.experts.down_proj": (experts, h, ffn),
        }
    if m.untie_embeddings_and_output_weights:
        shapes["lm_head.weight"] = (m.vocab_size, h)
    return shapes


def write_hf_dir(model: ModelConfig, path: Path, *, vision_only: bool = False) -> Path:
    """A Hugging Face directory of random weights for `model`: config.json and one safetensors file."""
    generator = torch.Generator().manual_seed(0)
    tensors = {
        name: torch.randn(shape, generator=generator).to(torch.bfloat16)
        for name, shape in hf_shapes(model).items()
        if not vision_only or name.startswith("model.visual.")
    }
    path.mkdir(parents=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config_dict(model), indent=2))
    return path


def write_checksums(checkpoint: Path) -> None:
    """Checksums in `sha256sum` format that match the files, as an attacker who changed them would write."""
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in checkpoint.iterdir()}
    digests.pop("checksums.sha256", None)
    (checkpoint / "checksums.sha256").write_text("".join(f"{d}  {n}\n" for n, d in sorted(digests.items())))


def read_metadata(checkpoint: Path):
    """The DCP metadata of one of this module's own checkpoints (trusted: written here)."""
    return pickle.loads((checkpoint / ".metadata").read_bytes())


@dataclass(frozen=True)
class Sources:
    hf: Path
    checkpoint: Path
    torch_dist_hf: Path
    marker: Path
    """What crafted files try to create: it must never exist."""


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Sources:
    root = tmp_path_factory.mktemp("sources")
    hf = write_hf_dir(load_config("tiny", overrides=SMALL).model, root / "hf")
    checkpoint = root / "checkpoint"
    assert run("convert", "hf-to-fsdp", "--hf", hf, "--out", checkpoint).code == 0
    torch_dist_hf = write_hf_dir(
        load_config("tiny", overrides=[*ODD, *OVERRIDES]).model, root / "td-hf", vision_only=True
    )
    return Sources(hf, checkpoint, torch_dist_hf, root / "code-ran")


# --- running the command line ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


def run(*args: object) -> Result:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return Result(code, out.getvalue(), err.getvalue())


def assert_clean(result: Result, *codes: int) -> None:
    """Exit status among `codes`; a failure says what is wrong in one line (or in a report) and no traceback."""
    assert result.code in codes, (result.code, result.err[-3000:], result.out[-3000:])
    assert "Traceback" not in result.err + result.out
    messages = [line for line in result.err.splitlines() if line.startswith("vlm-fsdp ")]
    if result.code == 2:
        assert len(messages) == 1 and ": error: " in messages[0], messages
    if result.code == 1:
        assert "PROBLEMS:" in result.out and "OK: complete" not in result.out
    if result.code == 0:
        assert not messages, messages


def files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@contextlib.contextmanager
def workspace(sources: Sources, *copies: Path) -> Iterator[tuple[Path, list[Path]]]:
    """A fresh directory with copies of `copies`; on leaving it, everything but `out` and `out.partial` must be
    unchanged, no `.partial` may be left behind and no crafted code may have run."""
    with tempfile.TemporaryDirectory(dir=sources.marker.parent) as tmp:
        work = Path(tmp)
        copied = [shutil.copytree(c, work / c.name) for c in copies]
        yield work, copied
        assert not sources.marker.exists(), "code from a crafted file ran"
        assert not (work / "out.partial").exists()


def unchanged_outside_output(work: Path, before: dict[str, str]) -> None:
    after = {k: v for k, v in files(work).items() if not k.startswith("out/") and not k.startswith("out.partial/")}
    assert after == before


# --- damage -----------------------------------------------------------------------------------------------------


def damage_strategy() -> st.SearchStrategy[tuple]:
    """Ways to damage a file; positions count modulo the file's size, and every way changes the file."""
    flips = st.lists(st.tuples(st.integers(0, 2**24), st.integers(1, 255)), min_size=1, max_size=4)
    return st.one_of(
        st.tuples(st.just("flip"), flips),
        st.tuples(st.just("truncate"), st.integers(0, 2**24)),
        st.tuples(st.just("garbage"), st.binary(min_size=0, max_size=300)),
        st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
    )


def damage(file: Path, how: tuple) -> None:
    data = bytearray(file.read_bytes())
    kind, arg = how
    if kind == "flip":
        masks = {}
        for position, mask in arg:
            masks.setdefault(position % len(data), mask)  # one mask per byte: two could cancel out
        for position, mask in masks.items():
            data[position] ^= mask
    elif kind == "truncate":
        del data[arg % len(data) :]
    elif kind == "garbage":
        data = bytearray(arg)
    else:
        data += arg
    file.write_bytes(bytes(data))


DATA_FILE = "__0_0.distcp"


def check_damaged_checkpoint(sources: Sources, name: str, how: tuple, *, keep_checksums: bool) -> None:
    """Damage one file of a copy of the checkpoint; inspect and convert it."""
    with workspace(sources, sources.checkpoint) as (work, (checkpoint,)):
        damage(checkpoint / name, how)
        if not keep_checksums:
            (checkpoint / "checksums.sha256").unlink(missing_ok=True)
        before = files(work)
        inspected = run("inspect", checkpoint)
        assert_clean(inspected, 1) if keep_checksums else assert_clean(inspected, 0, 1)
        converted = run("convert", "fsdp-to-hf", "--ckpt", checkpoint, "--out", work / "out")
        assert_clean(converted, 2) if keep_checksums else assert_clean(converted, 0, 2)
        unchecked = run("convert", "fsdp-to-hf", "--no-verify", "--ckpt", checkpoint, "--out", work / "out2")
        assert_clean(unchecked, 0, 2)
        shutil.rmtree(work / "out2", ignore_errors=True)
        unchanged_outside_output(work, before)


@FUZZ
@given(how=damage_strategy())
def test_damaged_metadata_is_reported(sources, how):
    check_damaged_checkpoint(sources, ".metadata", how, keep_checksums=True)


@FUZZ
@given(how=damage_strategy(), keep_checksums=st.booleans())
def test_damaged_data_file_is_reported(sources, how, keep_checksums):
    check_damaged_checkpoint(sources, DATA_FILE, how, keep_checksums=keep_checksums)


@settings(FUZZ, max_examples=12)
@given(how=damage_strategy(), keep_checksums=st.booleans())
def test_damaged_run_record_is_reported(sources, how, keep_checksums):
    check_damaged_checkpoint(sources, "run.yaml", how, keep_checksums=keep_checksums)


@settings(FUZZ, max_examples=12)
@given(how=damage_strategy())
def test_damaged_checksum_file_is_reported(sources, how):
    check_damaged_checkpoint(sources, "checksums.sha256", how, keep_checksums=True)


@settings(FUZZ, max_examples=15)
@given(how=damage_strategy())
def test_damaged_metadata_without_checksums_is_never_a_traceback(sources, how):
    check_damaged_checkpoint(sources, ".metadata", how, keep_checksums=False)


# --- crafted pickles --------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this calls `function(*args)`, which would create the marker file."""

    def __init__(self, function, args: tuple) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def payloads(marker: Path) -> list[Payload]:
    import builtins
    import subprocess

    code = f"open({str(marker)!r}, 'w').close()"
    return [
        Payload(os.system, (f"touch {marker}",)),
        Payload(subprocess.call, (["touch", str(marker)],)),
        Payload(builtins.exec, (code,)),
        Payload(builtins.eval, (f"__import__('pathlib').Path({str(marker)!r}).touch()",)),
        Payload(builtins.open, (str(marker), "w")),
        Payload(torch.load, (str(marker),)),
    ]


def crafted_metadata(checkpoint: Path, payload: Payload, where: str, protocol: int) -> bytes:
    """A `.metadata` with `payload` at the top, or hidden inside real DCP metadata."""
    if where == "top":
        return pickle.dumps(payload, protocol=protocol)
    metadata = read_metadata(checkpoint)
    if where == "planner_data":
        metadata.planner_data = {"model.x": payload}
    elif where == "storage_meta":
        metadata.storage_meta.checkpoint_id = payload
    else:
        first = next(iter(metadata.state_dict_metadata))
        metadata.state_dict_metadata[first].chunks[0] = payload
    return pickle.dumps(metadata, protocol=protocol)


@settings(FUZZ, max_examples=24)
@given(
    choice=st.integers(0, 5),
    where=st.sampled_from(["top", "planner_data", "storage_meta", "chunk"]),
    protocol=st.integers(0, pickle.HIGHEST_PROTOCOL),
    match_checksums=st.booleans(),
)
def test_crafted_metadata_runs_no_code(sources, choice, where, protocol, match_checksums):
    with workspace(sources, sources.checkpoint) as (work, (checkpoint,)):
        payload = payloads(sources.marker)[choice]
        (checkpoint / ".metadata").write_bytes(crafted_metadata(checkpoint, payload, where, protocol))
        if match_checksums:
            write_checksums(checkpoint)  # an attacker can make them match
        before = files(work)
        inspected = run("inspect", checkpoint)
        assert_clean(inspected, 1)
        assert "refusing to unpickle it" in inspected.out
        for args in (
            ("fsdp-to-hf", "--no-verify", "--ckpt", checkpoint, "--out", work / "out"),
            ("torch-dist-to-fsdp", "--ckpt", checkpoint, "--hf", sources.torch_dist_hf, "--out", work / "out", *ODD),
        ):
            converted = run("convert", *args)
            assert_clean(converted, 2)
            assert "refusing to unpickle it" in converted.err
        unchanged_outside_output(work, before)


@settings(FUZZ, max_examples=12)
@given(choice=st.integers(0, 5), key=st.sampled_from(["step", "model.language_model.decoder.final_layernorm.weight"]))
def test_crafted_object_in_a_data_file_runs_no_code(sources, choice, key):
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    with workspace(sources, sources.checkpoint) as (work, (checkpoint,)):
        buffer = io.BytesIO()
        torch.save(payloads(sources.marker)[choice], buffer)
        (checkpoint / "__1_0.distcp").write_bytes(buffer.getvalue())
        metadata = read_metadata(checkpoint)
        metadata.state_dict_metadata[key] = BytesStorageMetadata()
        metadata.storage_data[MetadataIndex(key)] = _StorageInfo("__1_0.distcp", 0, len(buffer.getvalue()))
        (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))
        write_checksums(checkpoint)
        before = files(work)
        assert_clean(run("inspect", checkpoint), 1)
        converted = run("convert", "fsdp-to-hf", "--ckpt", checkpoint, "--out", work / "out")
        assert_clean(converted, 2 if key.startswith("model.") else 0)  # the step is not read, so not run
        unchanged_outside_output(work, before)


# --- Hugging Face inputs ----------------------------------------------------------------------------------------


def check_hf_import(sources: Sources, prepare) -> None:
    """Convert a copy of the Hugging Face directory changed by `prepare(hf)`: refused in one line, or converted
    into a checkpoint that `inspect` finds complete and consistent with its config."""
    with workspace(sources, sources.hf) as (work, (hf,)):
        prepare(hf)
        before = files(work)
        converted = run("convert", "hf-to-fsdp", "--hf", hf, "--out", work / "out")
        assert_clean(converted, 0, 2)
        if converted.code == 0:
            assert_clean(run("inspect", work / "out"), 0)
        else:
            assert not (work / "out").exists()
        unchanged_outside_output(work, before)


@FUZZ
@given(how=damage_strategy())
def test_damaged_safetensors_are_refused_or_converted_consistently(sources, how):
    check_hf_import(sources, lambda hf: damage(hf / "model.safetensors", how))


@settings(FUZZ, max_examples=12)
@given(how=damage_strategy())
def test_damaged_config_json_is_refused_or_converted_consistently(sources, how):
    check_hf_import(sources, lambda hf: damage(hf / "config.json", how))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)


def _leaf_paths(config: dict, prefix: tuple = ()) -> list[tuple]:
    paths = []
    for key, value in config.items():
        paths += _leaf_paths(value, (*prefix, key)) if isinstance(value, dict) else [(*prefix, key)]
    return paths


def _edit(config: dict, path: tuple, value: object, delete: bool) -> None:
    for key in path[:-1]:
        config = config[key]
    if delete:
        del config[path[-1]]
    else:
        config[path[-1]] = value


@settings(FUZZ, max_examples=30)
@given(data=st.data(), delete=st.booleans())
def test_config_json_values_are_checked_against_the_weights(sources, data, delete):
    config = json.loads((sources.hf / "config.json").read_text())
    path = data.draw(st.sampled_from(_leaf_paths(config)), label="key")
    value = data.draw(st.one_of(JSON_VALUES, st.integers(0, 300), st.just("llama"), st.just([2, 2, 2])), label="value")
    _edit(config, path, value, delete)
    check_hf_import(sources, lambda hf: (hf / "config.json").write_text(json.dumps(config)))


# --- torch_dist inputs -----------------------------------------------------------------------------------------


@settings(FUZZ, max_examples=10)
@given(name=st.sampled_from([".metadata", "__0_0.distcp"]), how=damage_strategy())
def test_damaged_torch_dist_checkpoint_is_refused_or_converted(sources, name, how):
    with workspace(sources, TORCH_DIST) as (work, (checkpoint,)):
        damage(checkpoint / name, how)
        before = files(work)
        args = ("--ckpt", checkpoint, "--hf", sources.torch_dist_hf, "--out", work / "out", *ODD, *OVERRIDES)
        assert_clean(run("convert", "torch-dist-to-fsdp", *args), 0, 2)
        assert_clean(run("inspect", checkpoint), 1)  # no run.yaml, at least
        unchanged_outside_output(work, before)


# --- outputs that hold something --------------------------------------------------------------------------------


def _occupy(work: Path, how: str) -> None:
    out = work / "out"
    if how == "file":
        out.write_text("the user's file")
    elif how == "full directory":
        out.mkdir()
        (out / "notes.txt").write_text("the user's file")
    elif how == "symbolic link":
        (work / "elsewhere").mkdir()
        (work / "elsewhere" / "notes.txt").write_text("the user's file")
        out.symlink_to(work / "elsewhere")
    elif how == "parent is a file":
        (work / "parent").write_text("the user's file")
    elif how in ("user's .partial", "user's empty .partial"):
        (work / "out.partial").mkdir()
        if how == "user's .partial":
            (work / "out.partial" / "notes.txt").write_text("the user's file")
    else:
        assert how == "empty directory"
        out.mkdir()


@settings(FUZZ, max_examples=21)
@given(
    how=st.sampled_from(
        [
            "file",
            "full directory",
            "symbolic link",
            "parent is a file",
            "user's .partial",
            "user's empty .partial",
            "empty directory",
        ]
    ),
    command=st.sampled_from(["hf-to-fsdp", "fsdp-to-hf", "torch-dist-to-fsdp"]),
)
def test_an_occupied_output_is_refused_and_left_as_it_was(sources, how, command):
    with tempfile.TemporaryDirectory(dir=sources.marker.parent) as tmp:
        work = Path(tmp)
        _occupy(work, how)
        out = work / "parent" / "out" if how == "parent is a file" else work / "out"
        before = {k: v for k, v in files(work).items()}
        args = {
            "hf-to-fsdp": ("--hf", sources.hf),
            "fsdp-to-hf": ("--ckpt", sources.checkpoint),
            "torch-dist-to-fsdp": ("--ckpt", TORCH_DIST, "--hf", sources.torch_dist_hf, *ODD, *OVERRIDES),
        }[command]
        result = run("convert", command, *args, "--out", out)
        assert_clean(result, 0 if how == "empty directory" else 2)
        after = files(work)
        if how == "empty directory":
            assert (work / "out").is_dir() and not (work / "out.partial").exists()
            after = {k: v for k, v in after.items() if not k.startswith("out/")}
        assert after == before
