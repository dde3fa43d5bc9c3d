"""Hugging Face safetensors -> a model-only fsdp_dtensor (DCP) checkpoint, streamed one mapping entry at a time
(see `vlm_fsdp.checkpoint.streaming`)."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from vlm_fsdp.checkpoint.layout import is_complete, iteration_dir
from vlm_fsdp.checkpoint.streaming import write_streaming
from vlm_fsdp.config.model import ModelConfig
from vlm_fsdp.config.overrides import to_dict
from vlm_fsdp.errors import UserError
from vlm_fsdp.model.hf_config import architecture_mismatches
from vlm_fsdp.model.hf_mapping import Entry, mapping

SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


class HfCheckpoint:
    """Lazy access to the tensors of a Hugging Face model directory (one or many safetensors files)."""

    def __init__(self, directory: Path, stack: ExitStack) -> None:
        from safetensors import safe_open

        index = directory / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = [p.name for p in sorted(directory.glob("*.safetensors"))]
        if not files:
            raise UserError(f"{directory} has no *.safetensors files: expected a Hugging Face model directory")
        self.handles = {}
        for name in files:
            handle = stack.enter_context(safe_open(directory / name, framework="pt"))
            self.handles |= dict.fromkeys(handle.keys(), handle)

    def meta(self, name: str) -> torch.Tensor:
        tensor_slice = self._handle(name).get_slice(name)
        return torch.empty(tensor_slice.get_shape(), dtype=SAFETENSORS_DTYPES[tensor_slice.get_dtype()], device="meta")

    def load(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def _handle(self, name: str):
        if name not in self.handles:
            raise UserError(f"the Hugging Face checkpoint has no tensor {name}: is it a Qwen3-VL-MoE model of this "
                            "architecture?")  # fmt: skip
        return self.handles[name]


def check_architecture(hf_dir: Path, model: ModelConfig) -> None:
    config_json = hf_dir / "config.json"
    if not config_json.is_file():
        raise UserError(f"{hf_dir} has no config.json: expected a Hugging Face Qwen3-VL-MoE model directory")
    mismatches = architecture_mismatches(model, json.loads(config_json.read_text()))
    if mismatches:
        raise UserError(f"{hf_dir} holds another architecture than the config (ours != theirs):\n  "
                        + "\n  ".join(mismatches))  # fmt: skip


def hf_tensors(hf: HfCheckpoint, entries: list[Entry], model: ModelConfig) -> dict:
    """Our name -> (meta tensor, producer) for these mapping entries."""
    tensors = {}
    for entry in entries:
        meta = entry.to_ours([hf.meta(n) for n in entry.hf], model)

        def produce(entry=entry, dtype=meta.dtype):
            return entry.to_ours([hf.load(n) for n in entry.hf], model).to(dtype).contiguous()

        tensors[entry.ours] = (meta, produce)
    return tensors


def write_model_checkpoint(hf_dir: Path, out: Path, model: ModelConfig, *, point_latest: bool = True) -> Path:
    """Convert `hf_dir` into a model-only checkpoint at `out`."""
    check_architecture(hf_dir, model)
    record = {"model": to_dict(model), "source": {"hf_path": str(hf_dir.resolve())}}
    with ExitStack() as stack:
        tensors = hf_tensors(HfCheckpoint(hf_dir, stack), mapping(model), model)
        return write_streaming(out, tensors, record, point_latest=point_latest)


def import_hf(hf_dir: Path, work_dir: Path, model: ModelConfig, dist) -> Path:
    """The model-only checkpoint of `hf_dir` for this run, converted once by the main rank."""
    out = iteration_dir(work_dir, 0)
    if dist.is_main and not is_complete(out):
        write_model_checkpoint(hf_dir, out, model)
    torch.distributed.barrier()
    return out
