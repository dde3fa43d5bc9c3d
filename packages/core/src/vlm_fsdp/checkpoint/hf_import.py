"""Hugging Face safetensors -> a model-only fsdp_dtensor (DCP) checkpoint, streamed tensor group by tensor group.

DCP plans a save from shapes alone, so the state dict handed to it holds meta tensors; the planner then produces
each tensor (read from the safetensors files and mapped by `vlm_fsdp.model.hf_mapping`) only when the writer asks
for it. Peak memory is one mapping entry's tensors (the q/k/v of one layer, or one layer's stacked experts).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import yaml
from safetensors import safe_open
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter
from tqdm import tqdm
from vlm_fsdp.checkpoint.layout import PARTIAL, RUN_RECORD, finalize, is_complete, iteration_dir
from vlm_fsdp.config.model import ModelConfig
from vlm_fsdp.config.overrides import to_dict
from vlm_fsdp.errors import UserError
from vlm_fsdp.model.hf_config import architecture_mismatches
from vlm_fsdp.model.hf_mapping import Entry, mapping


class HfCheckpoint:
    """Lazy access to the tensors of a Hugging Face model directory (one or many safetensors files)."""

    def __init__(self, directory: Path, stack: ExitStack) -> None:
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
        dtype = getattr(torch, {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[tensor_slice.get_dtype()])
        return torch.empty(tensor_slice.get_shape(), dtype=dtype, device="meta")

    def load(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def _handle(self, name: str):
        if name not in self.handles:
            raise UserError(
                f"the Hugging Face checkpoint has no tensor {name}: is it a Qwen3-VL-MoE model of this architecture?"
            )
        return self.handles[name]


class _StreamingPlanner(DefaultSavePlanner):
    """Produces each tensor when the writer asks for it instead of holding them all."""

    def __init__(self, producers: dict[str, Callable[[], torch.Tensor]], progress: tqdm) -> None:
        super().__init__()
        self.producers = producers
        self.progress = progress

    def resolve_data(self, write_item):
        fqn = write_item.index.fqn
        if fqn not in self.producers:
            return super().resolve_data(write_item)
        self.progress.update(1)
        return self.producers[fqn]()


def _entries(model: ModelConfig, hf: HfCheckpoint) -> Iterator[tuple[Entry, torch.Tensor]]:
    for entry in mapping(model):
        yield entry, entry.to_ours([hf.meta(n) for n in entry.hf], model)


def write_model_checkpoint(
    hf_dir: Path, out: Path, model: ModelConfig, *, progress: bool = True, point_latest: bool = True
) -> Path:
    """Convert `hf_dir` into a model-only checkpoint at `out` (written under `.partial`, renamed when done)."""
    config_json = hf_dir / "config.json"
    if not config_json.is_file():
        raise UserError(f"{hf_dir} has no config.json: expected a Hugging Face Qwen3-VL-MoE model directory")
    mismatches = architecture_mismatches(model, json.loads(config_json.read_text()))
    if mismatches:
        raise UserError(
            f"{hf_dir} holds another architecture than the config (ours != theirs):\n  " + "\n  ".join(mismatches)
        )
    partial = out.with_name(out.name + PARTIAL)
    with ExitStack() as stack:
        hf = HfCheckpoint(hf_dir, stack)
        state, producers = {}, {}
        for entry, meta in _entries(model, hf):
            state[entry.ours] = meta

            def produce(entry=entry, dtype=meta.dtype):
                return entry.to_ours([hf.load(n) for n in entry.hf], model).to(dtype).contiguous()

            producers[f"model.{entry.ours}"] = produce
        bar = tqdm(total=len(producers), desc="convert", unit="tensor", disable=not progress)
        with bar:
            dcp.save(
                {"model": state},
                storage_writer=FileSystemWriter(partial, thread_count=1),
                planner=_StreamingPlanner(producers, bar),
                no_dist=True,
            )
    record = {"model": to_dict(model), "source": {"hf_path": str(hf_dir.resolve())}}
    (partial / RUN_RECORD).write_text(yaml.safe_dump(record, sort_keys=False))
    finalize(partial, out, point_latest=point_latest)
    return out


def import_hf(hf_dir: Path, work_dir: Path, model: ModelConfig, dist) -> Path:
    """The model-only checkpoint of `hf_dir` for this run, converted once by the main rank."""
    out = iteration_dir(work_dir, 0)
    if dist.is_main and not is_complete(out):
        write_model_checkpoint(hf_dir, out, model)
    torch.distributed.barrier()
    return out
