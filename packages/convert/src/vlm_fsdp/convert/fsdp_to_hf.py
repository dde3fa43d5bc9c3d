"""fsdp_dtensor checkpoint -> Hugging Face safetensors shards + index + config (+ tokenizer and processor files).

Reads with torch.distributed.checkpoint into plain CPU tensors, so a checkpoint written by any number of ranks
converts in one process; tensors are read one output shard at a time (peak memory about one shard). The
checkpoint is verified against its checksums and its metadata against the architecture before anything is
written; the output is written under `OUT.partial`, locked, and renamed when complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.metadata import Metadata
from tqdm import tqdm
from vlm_fsdp.checkpoint.checksums import verify_checksums
from vlm_fsdp.checkpoint.hf_import import architecture_problem, checkpoint_tensor_problems
from vlm_fsdp.checkpoint.layout import check_new_output, finalize, resolve_checkpoint, writing
from vlm_fsdp.checkpoint.safe_reader import load_tensors, read_metadata, storage_problems
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


def _check_model_tensors(checkpoint: Path, metadata: Metadata, model: ModelConfig) -> None:
    problems = (
        [p for p in [architecture_problem(model)] if p]
        or checkpoint_tensor_problems(metadata, model)
        or storage_problems(checkpoint, metadata)
    )
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"{checkpoint} cannot be converted: {'; '.join(problems[:3])}{more} "
                        "(`vlm-fsdp inspect` lists what it holds)")  # fmt: skip


def _read_shard(checkpoint: Path, metadata: Metadata, shard: list[Entry], model: ModelConfig,
                dtype: torch.dtype) -> dict[str, torch.Tensor]:  # fmt: skip
    """The Hugging Face tensors of one output shard."""
    saved = {e.ours: metadata.state_dict_metadata[f"model.{e.ours}"] for e in shard}
    state = {"model": {name: torch.empty(tuple(m.size), dtype=m.properties.dtype) for name, m in saved.items()}}
    load_tensors(state, checkpoint, metadata=metadata, no_dist=True)
    tensors = {}
    for entry in shard:
        for name, tensor in zip(entry.hf, entry.to_hf(state["model"].pop(entry.ours), model), strict=True):
            tensors[name] = tensor.to(dtype).contiguous()
    return tensors


def _write_shard(tensors: dict[str, torch.Tensor], file: Path) -> None:
    try:
        save_file(tensors, file, metadata={"format": "pt"})
    except Exception as err:  # safetensors raises its own error type for I/O failures
        raise UserError(f"cannot write {file}: {err}") from None


def _copy_tokenizer(record: dict, partial: Path) -> None:
    source = tokenizer_source(record)
    if source is None:
        return
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, partial / name)


def export_hf(
    checkpoint: Path,
    out: Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    model: ModelConfig | None = None,
    progress: bool = True,
    verify: bool = True,
) -> Path:
    """Write the model of `checkpoint` to `out` as a Hugging Face Qwen3-VL-MoE directory; `verify`: check the
    checkpoint's files against its checksums first."""
    checkpoint = resolve_checkpoint(checkpoint)
    check_new_output(out)
    if verify:
        verify_checksums(checkpoint, progress=progress)
    record = read_record(checkpoint) if model is None else {}
    model = model or model_config(record)
    metadata = read_metadata(checkpoint)
    _check_model_tensors(checkpoint, metadata, model)
    entries = mapping(model)
    shards = _shards(entries, metadata.state_dict_metadata, torch.empty((), dtype=dtype).element_size())
    weight_map, total = {}, 0
    with writing(out) as partial:
        with tqdm(total=len(entries), desc="export", unit="tensor", disable=not progress) as bar:
            for number, shard in enumerate(shards, start=1):
                tensors = _read_shard(checkpoint, metadata, shard, model, dtype)
                bar.update(len(shard))
                filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
                _write_shard(tensors, partial / filename)
                total += sum(t.numel() * t.element_size() for t in tensors.values())
                weight_map |= dict.fromkeys(tensors, filename)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = hf_config_dict(model) | {"dtype": str(dtype).removeprefix("torch.")}
        (partial / "config.json").write_text(json.dumps(config, indent=2))
        _copy_tokenizer(record, partial)
        finalize(partial, out, point_latest=False, replace=False, checksums=False)
    return out
