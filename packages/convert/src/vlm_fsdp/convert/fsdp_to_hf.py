"""fsdp_dtensor checkpoint -> Hugging Face safetensors shards + index + config (+ tokenizer and processor files).

Reads with torch.distributed.checkpoint into plain CPU tensors, so a checkpoint written by any number of ranks
converts in one process; tensors are read one output shard at a time (peak memory about one shard).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from tqdm import tqdm
from vlm_fsdp.checkpoint.layout import resolve_checkpoint
from vlm_fsdp.config.model import ModelConfig
from vlm_fsdp.convert.records import TOKENIZER_FILES, model_config, read_record, tokenizer_source
from vlm_fsdp.errors import UserError
from vlm_fsdp.model.hf_config import hf_config_dict
from vlm_fsdp.model.hf_mapping import Entry, mapping

SHARD_BYTES = 4 * 1024**3


def _shards(entries: list[Entry], metadata, itemsize: int) -> list[list[Entry]]:
    shards, current, size = [], [], 0
    for entry in entries:
        numel = metadata[f"model.{entry.ours}"].size.numel()
        if current and size + numel * itemsize > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += numel * itemsize
    return [*shards, current] if current else shards


def export_hf(
    checkpoint: Path,
    out: Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    model: ModelConfig | None = None,
    progress: bool = True,
) -> Path:
    """Write the model of `checkpoint` to `out` as a Hugging Face Qwen3-VL-MoE directory."""
    checkpoint = resolve_checkpoint(checkpoint)
    record = read_record(checkpoint) if model is None else {}
    model = model or model_config(record)
    metadata = FileSystemReader(checkpoint).read_metadata().state_dict_metadata
    entries = mapping(model)
    missing = [f"model.{e.ours}" for e in entries if f"model.{e.ours}" not in metadata]
    if missing:
        raise UserError(
            f"{checkpoint} lacks {len(missing)} of the model's tensors, e.g. {missing[:3]} "
            "(`vlm-fsdp inspect` lists what it holds)"
        )
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose a new output directory")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    shards = _shards(entries, metadata, torch.empty((), dtype=dtype).element_size())
    weight_map, total = {}, 0
    bar = tqdm(total=len(entries), desc="export", unit="tensor", disable=not progress)
    for number, shard in enumerate(shards, start=1):
        state = {
            "model": {
                e.ours: torch.empty(
                    tuple(metadata[f"model.{e.ours}"].size), dtype=metadata[f"model.{e.ours}"].properties.dtype
                )
                for e in shard
            }
        }
        dcp.load(
            state,
            storage_reader=FileSystemReader(checkpoint),
            planner=DefaultLoadPlanner(allow_partial_load=True),
            no_dist=True,
        )
        tensors = {}
        for entry in shard:
            for name, tensor in zip(entry.hf, entry.to_hf(state["model"].pop(entry.ours), model), strict=True):
                tensors[name] = tensor.to(dtype).contiguous()
            bar.update(1)
        filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, partial / filename, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map |= dict.fromkeys(tensors, filename)
    bar.close()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = hf_config_dict(model) | {"dtype": str(dtype).removeprefix("torch.")}
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    source = tokenizer_source(record)
    if source is not None:
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, partial / name)
    if out.exists():
        out.rmdir()
    partial.rename(out)
    return out
