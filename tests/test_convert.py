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

# our own shape: odd widths, one key/value head, six experts, three DeepStack-fed vision blocks
ODD = [
    "model.hidden_size=200",
    "model.num_attention_heads=5",
    "model.num_query_groups=1",
    "model.kv_channels=40",
    "model.mrope_section=[8, 6, 6]",
    "model.num_moe_experts=6",
    "model.moe_ffn_hidden_size=56",
    "model.moe_router_topk=2",
    "model.num_layers=3",
    "model.ffn_hidden_size=300",
    "model.vision.depth=3",
    "model.vision.hidden_size=72",
    "model.vision.num_heads=3",
    "model.vision.intermediate_size=100",
    "model.vision.deepstack_visual_indexes=[0, 2]",
    "model.vision.num_position_embeddings=256",
]


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
