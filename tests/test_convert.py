"""Checkpoint conversion and inspection on the CPU: Hugging Face -> fsdp_dtensor -> Hugging Face gives back every
tensor bit for bit, also for checkpoints written by two ranks; broken checkpoints are reported as such."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration
from vlm_fsdp.cli.main import main
from vlm_fsdp.config import load_config
from vlm_fsdp.model.hf_config import hf_config_dict

from tests.data.make_torch_dist import ODD


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            tensors |= {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    return tensors


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    model = load_config("tiny", overrides=ODD).model
    torch.manual_seed(0)
    hf = Qwen3VLMoeForConditionalGeneration(Qwen3VLMoeConfig(**hf_config_dict(model))).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("hf") / "model"
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(hf_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "converted"
    assert main(["convert", "hf-to-fsdp", "--hf", str(hf_dir), "--out", str(out)]) == 0
    return out


def assert_same_tensors(original: Path, exported: Path) -> None:
    before, after = read_tensors(original), read_tensors(exported)
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name


def test_round_trip_is_bitwise_and_loads_in_transformers(hf_dir, checkpoint, tmp_path):
    out = tmp_path / "exported"
    assert main(["convert", "fsdp-to-hf", "--ckpt", str(checkpoint), "--out", str(out)]) == 0
    assert_same_tensors(hf_dir, out)
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    reloaded = Qwen3VLMoeForConditionalGeneration.from_pretrained(out)
    original = Qwen3VLMoeForConditionalGeneration.from_pretrained(hf_dir)
    for (name, a), (_, b) in zip(original.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def _reshard_on_two_ranks(rank: int, source: str, target: str, port: int) -> None:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    metadata = dcp.FileSystemReader(source).read_metadata().state_dict_metadata
    full = {
        k.removeprefix("model."): torch.empty(tuple(m.size), dtype=torch.float32)
        for k, m in metadata.items()
        if isinstance(m, TensorStorageMetadata)
    }
    dcp.load({"model": full}, checkpoint_id=source)
    mesh = init_device_mesh("cpu", (2,))
    sharded = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in full.items()}
    dcp.save({"model": sharded, "step": 7}, checkpoint_id=target)
    torch.distributed.destroy_process_group()


def test_checkpoint_written_by_two_ranks_converts_bitwise(hf_dir, checkpoint, tmp_path):
    from vlm_fsdp.train.parallel import free_port

    two = tmp_path / "two-ranks"
    torch.multiprocessing.spawn(_reshard_on_two_ranks, args=(str(checkpoint), str(two), free_port()), nprocs=2)
    shutil.copy(checkpoint / "run.yaml", two / "run.yaml")
    out = tmp_path / "exported"
    assert main(["convert", "fsdp-to-hf", "--ckpt", str(two), "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert_same_tensors(hf_dir, out)
    assert main(["inspect", str(two), "--json"]) == 0


def test_published_expert_layout_is_transposed_on_import(hf_dir, tmp_path):
    legacy = tmp_path / "legacy"
    shutil.copytree(hf_dir, legacy)
    tensors = read_tensors(hf_dir)
    for name in [n for n in tensors if ".mlp.experts." in n]:
        tensors[name] = tensors[name].transpose(1, 2).contiguous()
    for file in legacy.glob("*.safetensors"):
        file.unlink()
    save_file(tensors, legacy / "model.safetensors", metadata={"format": "pt"})
    (legacy / "model.safetensors.index.json").unlink(missing_ok=True)
    assert main(["convert", "hf-to-fsdp", "--hf", str(legacy), "--out", str(tmp_path / "ckpt")]) == 0
    assert main(["convert", "fsdp-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]) == 0
    assert_same_tensors(hf_dir, tmp_path / "out")


def test_architecture_mismatch_is_refused(hf_dir, tmp_path, capsys):
    assert main(["convert", "hf-to-fsdp", "--hf", str(hf_dir), "--out", str(tmp_path / "x"), "--recipe", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "another architecture" in err and "model.hidden_size: 256 != 200" in err


def test_inspect_lists_tensors_and_reports_a_truncated_checkpoint(checkpoint, tmp_path, capsys):
    assert main(["inspect", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "format      fsdp_dtensor" in out and "model.language_model.decoder.layers.2.mlp.experts.down_proj" in out
    assert "OK: complete" in out

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (data,) = broken.glob("*.distcp")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    assert main(["inspect", str(broken)]) == 1
    out = capsys.readouterr().out
    assert "is truncated" in out and "model." in out

    partial = tmp_path / "save" / "iter_0000009.partial"
    partial.mkdir(parents=True)
    assert main(["inspect", str(tmp_path / "save")]) == 1
    out = capsys.readouterr().out
    assert "interrupted saves (never loaded): iter_0000009.partial" in out and "no complete checkpoint" in out


def test_torch_dist_checkpoint_converts_layer_by_layer(tmp_path):
    from tests.data.make_torch_dist import OUT as TORCH_DIST
    from tests.data.make_torch_dist import OVERRIDES

    model = load_config("tiny", overrides=[*ODD, *OVERRIDES]).model
    hf = Qwen3VLMoeForConditionalGeneration(Qwen3VLMoeConfig(**hf_config_dict(model))).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf")
    out = tmp_path / "converted"
    args = [
        "convert",
        "torch-dist-to-fsdp",
        "--ckpt",
        str(TORCH_DIST),
        "--hf",
        str(tmp_path / "hf"),
        "--out",
        str(out),
        *ODD,
        *OVERRIDES,
    ]
    assert main(args) == 0

    source = dcp.FileSystemReader(TORCH_DIST).read_metadata().state_dict_metadata
    stacked = {
        k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
        for k, m in source.items()
        if hasattr(m, "size") and not k.endswith("_extra_state")
    }
    dcp.load(stacked, checkpoint_id=TORCH_DIST, no_dist=True)
    converted_md = dcp.FileSystemReader(out).read_metadata().state_dict_metadata
    converted = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in converted_md.items()}
    dcp.load(converted, checkpoint_id=out, no_dist=True)
    layers = "model.language_model.decoder.layers"
    assert torch.equal(
        converted[f"{layers}.2.input_layernorm.weight"],
        stacked["decoder.layers.self_attention.linear_qkv.layer_norm_weight"][2],
    )
    assert torch.equal(
        converted[f"{layers}.1.mlp.experts.gate_up_proj"],
        stacked["decoder.layers.mlp.experts.experts.linear_fc1.weight"][1],
    )
    assert torch.equal(
        converted[f"{layers}.0.pre_mlp_layernorm.weight"], stacked["decoder.layers.mlp.linear_fc1.layer_norm_weight"][0]
    )
    assert torch.equal(converted["model.language_model.output_layer.weight"], stacked["output_layer.weight"])
    visual = hf.state_dict()["model.visual.blocks.1.attn.qkv.weight"]
    assert torch.equal(converted["model.vision.blocks.1.attn.qkv.weight"], visual)
    assert main(["convert", "fsdp-to-hf", "--ckpt", str(out), "--out", str(tmp_path / "back")]) == 0
    Qwen3VLMoeForConditionalGeneration.from_pretrained(tmp_path / "back")


# --- untrusted and damaged inputs: one clear message each, nothing executed, nothing lost -----------------------


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _error(capsys) -> str:
    """The one error line the command printed."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vlm-fsdp ")]
    assert len(lines) == 1, lines
    return lines[0]


class _RunsCommand:
    """Unpickling this runs `touch <marker>`, as a crafted checkpoint would run anything."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_crafted_metadata_runs_nothing(checkpoint, tmp_path, capsys):
    import pickle

    marker = tmp_path / "ran"
    crafted = _copy(checkpoint, tmp_path / "crafted")
    (crafted / ".metadata").write_bytes(pickle.dumps(_RunsCommand(marker)))
    assert main(["inspect", str(crafted)]) == 1
    out = capsys.readouterr().out
    assert "references posix.system: refusing to unpickle it" in out and "OK: complete" not in out
    args = ["convert", "fsdp-to-hf", "--no-verify", "--ckpt", str(crafted), "--out", str(tmp_path / "out")]
    assert main(args) == 2
    assert "refusing to unpickle it" in _error(capsys)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_crafted_pickled_object_in_a_data_file_runs_nothing(checkpoint, tmp_path, capsys):
    import io
    import pickle

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex
    from vlm_fsdp.checkpoint.checksums import write_checksums
    from vlm_fsdp.checkpoint.safe_reader import read_metadata

    marker = tmp_path / "ran"
    crafted = _copy(checkpoint, tmp_path / "crafted")
    payload = io.BytesIO()
    torch.save(_RunsCommand(marker), payload)
    (crafted / "__9_0.distcp").write_bytes(payload.getvalue())
    metadata = read_metadata(crafted)
    weight = "model.language_model.decoder.final_layernorm.weight"
    for key in ("step", weight):
        metadata.state_dict_metadata[key] = BytesStorageMetadata()
        metadata.storage_data[MetadataIndex(key)] = _StorageInfo("__9_0.distcp", 0, len(payload.getvalue()))
    (crafted / ".metadata").write_bytes(pickle.dumps(metadata))
    write_checksums(crafted)  # an attacker can make them match
    assert main(["inspect", str(crafted)]) == 1
    out = capsys.readouterr().out
    assert "the step cannot be read" in out and f"{weight} is stored as an object" in out
    assert main(["convert", "fsdp-to-hf", "--ckpt", str(crafted), "--out", str(tmp_path / "out")]) == 2
    assert f"{weight} is stored as an object" in _error(capsys)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_metadata_is_one_clear_message(checkpoint, tmp_path, capsys, damage):
    broken = _copy(checkpoint, tmp_path / "broken")
    metadata = broken / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:100] if damage == "truncated" else b"\x80\x04garbage" * 20)
    assert main(["inspect", str(broken)]) == 1
    out = capsys.readouterr().out
    assert ".metadata does not match its checksum" in out and "is not readable DCP metadata" in out
    assert main(["convert", "fsdp-to-hf", "--ckpt", str(broken), "--out", str(tmp_path / "a")]) == 2
    assert ".metadata does not match its checksum" in _error(capsys)
    assert main(["convert", "fsdp-to-hf", "--no-verify", "--ckpt", str(broken), "--out", str(tmp_path / "b")]) == 2
    assert "is not readable DCP metadata" in _error(capsys)


def test_a_flipped_byte_in_a_data_file_is_found(checkpoint, tmp_path, capsys):
    broken = _copy(checkpoint, tmp_path / "broken")
    (data,) = broken.glob("*.distcp")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))
    assert main(["inspect", str(broken)]) == 1
    assert f"{data.name} does not match its checksum" in capsys.readouterr().out
    assert main(["convert", "fsdp-to-hf", "--ckpt", str(broken), "--out", str(tmp_path / "out")]) == 2
    assert f"{data.name} does not match its checksum" in _error(capsys)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_missing_files_are_named(checkpoint, hf_dir, tmp_path, capsys):
    broken = _copy(checkpoint, tmp_path / "broken")
    (data,) = broken.glob("*.distcp")
    data.unlink()
    assert main(["inspect", str(broken)]) == 1
    out = capsys.readouterr().out
    assert (
        f"{data.name} is listed in checksums.sha256 but missing" in out and f"data file {data.name} is missing" in out
    )
    assert main(["convert", "fsdp-to-hf", "--no-verify", "--ckpt", str(broken), "--out", str(tmp_path / "o")]) == 2
    assert f"data file {data.name} is missing" in _error(capsys)

    sharded = _hf_copy(hf_dir, tmp_path / "sharded")
    index = {"weight_map": {"model.language_model.norm.weight": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert main(["convert", "hf-to-fsdp", "--hf", str(sharded), "--out", str(tmp_path / "o")]) == 2
    assert "model-00002-of-00002.safetensors is missing (model.safetensors.index.json names it)" in _error(capsys)


def test_a_checkpoint_without_checksums_still_loads(checkpoint, tmp_path, capsys):
    old = _copy(checkpoint, tmp_path / "old")
    (old / "checksums.sha256").unlink()
    assert main(["inspect", str(old)]) == 0
    assert "checksums   none (no checksums" in capsys.readouterr().out
    assert main(["convert", "fsdp-to-hf", "--ckpt", str(old), "--out", str(tmp_path / "out")]) == 0


def _hf_copy(hf_dir: Path, target: Path, change=None) -> Path:
    """A copy of the Hugging Face directory with its tensors changed by `change(tensors)`."""
    shutil.copytree(hf_dir, target)
    if change is not None:
        tensors = read_tensors(target)
        change(tensors)
        for file in target.glob("*.safetensors"):
            file.unlink()
        (target / "model.safetensors.index.json").unlink(missing_ok=True)
        save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def test_hf_import_refuses_what_does_not_fit_the_config(hf_dir, tmp_path, capsys):
    def convert(hf: Path) -> str:
        assert main(["convert", "hf-to-fsdp", "--hf", str(hf), "--out", str(tmp_path / "out")]) == 2
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
        return _error(capsys)

    q = "model.language_model.layers.1.self_attn.q_proj.weight"
    short = _hf_copy(hf_dir, tmp_path / "short", lambda t: t.update({q: t[q][:-1]}))
    assert f"{q} in {short / 'model.safetensors'} has shape [199, 200], but config.json needs [200, 200]" in convert(
        short
    )
    norm = "model.language_model.norm.weight"
    ints = _hf_copy(hf_dir, tmp_path / "ints", lambda t: t.update({norm: t[norm].to(torch.int32)}))
    assert f"{norm} in {ints / 'model.safetensors'} has dtype I32" in convert(ints)

    fewer = _hf_copy(hf_dir, tmp_path / "fewer-layers")
    config = json.loads((fewer / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 2
    (fewer / "config.json").write_text(json.dumps(config))
    assert "tensors config.json does not account for, e.g. ['model.language_model.layers.2." in convert(fewer)

    llama = _hf_copy(hf_dir, tmp_path / "llama")
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    assert "describes a 'llama' model" in convert(llama)

    truncated = _hf_copy(hf_dir, tmp_path / "truncated")
    for file in truncated.glob("*.safetensors"):
        file.write_bytes(file.read_bytes()[:-1000])
    assert "is not a readable safetensors file (truncated or damaged?)" in convert(truncated)


def test_torch_dist_import_refuses_a_missing_or_foreign_checkpoint(checkpoint, hf_dir, tmp_path, capsys):
    def convert(ckpt: Path) -> str:
        args = ["convert", "torch-dist-to-fsdp", "--ckpt", str(ckpt), "--hf", str(hf_dir), "--out", str(tmp_path / "o")]
        assert main([*args, *ODD]) == 2
        return _error(capsys)

    assert "is not a directory: expected a DCP checkpoint directory" in convert(tmp_path / "missing")
    assert "has none of" in convert(checkpoint)


def test_outputs_that_hold_something_are_refused_and_kept(checkpoint, hf_dir, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine").write_text("keep me")
    users = tmp_path / "out.partial"  # the user's own directory, which happens to have our temporary name
    users.mkdir()
    (users / "mine").write_text("keep me")
    for args, message in [
        (["convert", "fsdp-to-hf", "--ckpt", str(checkpoint), "--out", str(a_file)], "is a file"),
        (["convert", "hf-to-fsdp", "--hf", str(hf_dir), "--out", str(a_file)], "is a file"),
        (["convert", "hf-to-fsdp", "--hf", str(hf_dir), "--out", str(a_file / "x")], "is a file, not a directory"),
        (["convert", "fsdp-to-hf", "--ckpt", str(checkpoint), "--out", str(full)], "exists and is not empty"),
        (["convert", "fsdp-to-hf", "--ckpt", str(checkpoint), "--out", str(tmp_path / "out")], "was not created by"),
        (["convert", "fsdp-to-hf", "--ckpt", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], "no complete"),
    ]:
        assert main(args) == 2
        assert message in _error(capsys)
    assert a_file.read_text() == (full / "mine").read_text() == (users / "mine").read_text() == "keep me"
    with pytest.raises(SystemExit) as exit_:
        main(["convert", "fsdp-to-hf", "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(hf_dir, tmp_path, capsys):
    import os
    import subprocess
    import sys

    from vlm_fsdp.checkpoint.layout import writing

    out = tmp_path / "out"
    with writing(out):
        assert main(["convert", "hf-to-fsdp", "--hf", str(hf_dir), "--out", str(out)]) == 2
        assert f"{out} is being written by process {os.getpid()}" in _error(capsys)
    assert [p.name for p in (tmp_path / "out.partial").iterdir()] == [".vlm-fsdp-lock"]  # not finalised: kept

    hold = "import sys, time; from pathlib import Path; from vlm_fsdp.checkpoint.layout import writing\n"
    hold += "with writing(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    assert main(["convert", "hf-to-fsdp", "--hf", str(hf_dir), "--out", str(out)]) == 2
    assert f"is being written by process {holder.pid}" in _error(capsys)
    holder.kill()  # dies without cleaning up: its lock goes with it, its directory stays
    holder.wait()
    assert (tmp_path / "out.partial").is_dir()
    assert main(["convert", "hf-to-fsdp", "--hf", str(hf_dir), "--out", str(out)]) == 0
    assert main(["inspect", str(out)]) == 0


def test_ctrl_c_exits_130_with_one_line_and_leaves_no_partial_output(checkpoint, hf_dir, tmp_path, capsys, monkeypatch):
    from vlm_fsdp.checkpoint.hf_import import HfCheckpoint
    from vlm_fsdp.checkpoint.safe_reader import SafeFileSystemReader

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(HfCheckpoint, "load", interrupt)  # inside DCP's writer, which wraps every exception
    assert main(["convert", "hf-to-fsdp", "--hf", str(hf_dir), "--out", str(tmp_path / "a")]) == 130
    assert _error(capsys) == "vlm-fsdp convert: interrupted"
    monkeypatch.setattr(SafeFileSystemReader, "read_data", interrupt)  # inside DCP's reader
    assert main(["convert", "fsdp-to-hf", "--ckpt", str(checkpoint), "--out", str(tmp_path / "b")]) == 130
    assert _error(capsys) == "vlm-fsdp convert: interrupted"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_finalize_replaces_only_its_own_checkpoints(checkpoint, tmp_path):
    from vlm_fsdp.checkpoint.layout import finalize, writing
    from vlm_fsdp.errors import UserError

    final = tmp_path / "iter_0000001"
    final.mkdir()
    (final / "notes.txt").write_text("keep me")
    with writing(final) as partial:
        shutil.copy(checkpoint / ".metadata", partial)
        with pytest.raises(UserError, match="is not a checkpoint that vlm-fsdp finalised"):
            finalize(partial, final)
    assert (final / "notes.txt").read_text() == "keep me"

    ours = _copy(checkpoint, tmp_path / "iter_0000002")
    with writing(ours) as partial:
        for name in (".metadata", "run.yaml"):
            shutil.copy(checkpoint / name, partial)
        finalize(partial, ours)
    assert sorted(p.name for p in ours.iterdir()) == [".metadata", "checksums.sha256", "run.yaml"]
    assert (tmp_path / "latest").read_text() == "iter_0000002\n"


def test_prune_deletes_only_old_checkpoints_and_its_own_leftovers(tmp_path):
    import subprocess
    import sys

    from vlm_fsdp.checkpoint.layout import iteration_dir, prune

    for step in (1, 2, 3, 4):
        (iteration_dir(tmp_path, step)).mkdir()
        (iteration_dir(tmp_path, step) / ".metadata").write_bytes(b"")
    (tmp_path / "latest").write_text("iter_0000002\n")  # a run resumed from an older checkpoint
    users = tmp_path / "iter_0000009.partial"
    users.mkdir()
    (users / "mine").write_text("keep me")
    leftover = "import sys; from pathlib import Path; from vlm_fsdp.checkpoint.layout import writing\n"
    leftover += "w = writing(Path(sys.argv[1])); w.__enter__(); os._exit(0)"  # dies while writing
    subprocess.run([sys.executable, "-c", f"import os; {leftover}", str(iteration_dir(tmp_path, 5))], check=True)
    assert (tmp_path / "iter_0000005.partial").is_dir()
    (tmp_path / "notes").mkdir()
    prune(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter_0000002",
        "iter_0000004",
        "iter_0000009.partial",
        "latest",
        "notes",
    ]
    assert (users / "mine").read_text() == "keep me"


def test_model_tensor_shapes_cover_the_mapping():
    from vlm_fsdp.checkpoint.hf_import import model_tensor_shapes
    from vlm_fsdp.model.hf_mapping import mapping

    for overrides in ([], ODD, ["model.untie_embeddings_and_output_weights=false"]):
        model = load_config("tiny", overrides=overrides).model
        assert sorted(model_tensor_shapes(model)) == sorted(e.ours for e in mapping(model))
