"""`vlm-fsdp inspect`: what a checkpoint holds, and what is wrong with it when it is incomplete or corrupt."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata
from vlm_fsdp.checkpoint.layout import METADATA, PARTIAL, RUN_RECORD, complete_checkpoints, latest_checkpoint
from vlm_fsdp.convert.records import model_config
from vlm_fsdp.errors import UserError
from vlm_fsdp.model.hf_mapping import mapping


def _sharding(meta: TensorStorageMetadata) -> str:
    chunks = meta.chunks
    if len(chunks) == 1:
        return "1 piece"
    split = sorted({dim for c in chunks for dim, off in enumerate(c.offsets) if off})
    return f"{len(chunks)} pieces split along dim {', '.join(map(str, split)) or '?'}"


def _storage_problems(path: Path, metadata) -> list[str]:
    """Data files that are missing or shorter than the byte ranges the metadata points into."""
    needed: dict[str, int] = defaultdict(int)
    owners: dict[str, set[str]] = defaultdict(set)
    for index, info in (metadata.storage_data or {}).items():
        needed[info.relative_path] = max(needed[info.relative_path], info.offset + info.length)
        owners[info.relative_path].add(index.fqn)
    problems = []
    for name, size in sorted(needed.items()):
        file = path / name
        examples = ", ".join(sorted(owners[name])[:3])
        if not file.is_file():
            problems.append(f"data file {name} is missing ({len(owners[name])} entries, e.g. {examples})")
        elif file.stat().st_size < size:
            problems.append(
                f"data file {name} is truncated: {file.stat().st_size} of {size} bytes "
                f"({len(owners[name])} entries, e.g. {examples})"
            )
    return problems


def _read_objects(path: Path, keys: list[str]) -> dict[str, Any]:
    state = dict.fromkeys(keys, b"")
    dcp.load(
        state, storage_reader=FileSystemReader(path), planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=True
    )
    return state


def inspect_checkpoint(path: Path) -> dict[str, Any]:
    """A report of the checkpoint at `path` (a checkpoint directory or a save directory of several)."""
    report: dict[str, Any] = {"path": str(path), "problems": []}
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if path.is_dir() and not (path / METADATA).exists() and not path.name.endswith(PARTIAL):
        found = complete_checkpoints(path)
        partial = sorted(p.name for p in path.glob(f"*{PARTIAL}"))
        report["checkpoints"] = [p.name for p in found]
        if partial:
            report["problems"].append(f"interrupted saves (never loaded): {', '.join(partial)}")
        latest = latest_checkpoint(path)
        if latest is None:
            report["problems"].append(f"no complete checkpoint in {path} (none has {METADATA})")
            report["format"] = "unknown"
            return report
        report["latest"] = latest.name
        path = latest
        report["path"] = str(path)
    if path.name.endswith(PARTIAL) or not (path / METADATA).is_file():
        report["format"] = "incomplete"
        report["problems"].append(
            f"{path.name} is incomplete: the save was interrupted before {METADATA} was "
            "written, so no tensor in it can be trusted"
        )
        return report
    metadata = FileSystemReader(path).read_metadata()
    megatron = path / "metadata.json"
    report["format"] = "torch_dist" if megatron.is_file() and "torch_dist" in megatron.read_text() else "fsdp_dtensor"
    report["problems"] += _storage_problems(path, metadata)
    tensors, objects = [], []
    for fqn, meta in sorted(metadata.state_dict_metadata.items()):
        if isinstance(meta, TensorStorageMetadata):
            tensors.append(
                {
                    "name": fqn,
                    "shape": list(meta.size),
                    "dtype": str(meta.properties.dtype).removeprefix("torch."),
                    "sharding": _sharding(meta),
                }
            )
        elif isinstance(meta, BytesStorageMetadata):
            objects.append(fqn)
    report["tensors"] = tensors
    report["parameters"] = sum(torch.Size(t["shape"]).numel() for t in tensors if t["name"].startswith("model."))
    if not report["problems"] and "step" in objects:
        report["step"] = int(_read_objects(path, ["step"])["step"])
    report["ranks_with_rng_state"] = sorted(int(o.split("/")[1]) for o in objects if o.startswith("rng/"))
    record_path = path / RUN_RECORD
    if record_path.is_file():
        import yaml

        record = yaml.safe_load(record_path.read_text()) or {}
        report["provenance"] = record.get("provenance") or record.get("source")
        report["config"] = {k: v for k, v in record.items() if k not in ("provenance", "source")}
        names = {t["name"] for t in tensors}
        absent = [f"model.{e.ours}" for e in mapping(model_config(record)) if f"model.{e.ours}" not in names]
        if absent:
            report["problems"].append(f"{len(absent)} model tensors the config needs are absent, e.g. {absent[:3]}")
    else:
        report["problems"].append(f"no {RUN_RECORD}: the config and provenance of this checkpoint are unknown")
    return report


def render(report: dict[str, Any]) -> str:
    lines = [f"checkpoint  {report['path']}", f"format      {report.get('format', 'unknown')}"]
    if "checkpoints" in report:
        lines.append(f"in folder   {', '.join(report['checkpoints']) or 'none'} (latest: {report.get('latest')})")
    if "step" in report:
        lines.append(f"step        {report['step']}")
    if "parameters" in report:
        lines.append(f"parameters  {report['parameters']:,}")
    if report.get("ranks_with_rng_state"):
        lines.append(f"written by  {len(report['ranks_with_rng_state'])} rank(s)")
    if report.get("provenance"):
        lines.append("provenance  " + json.dumps(report["provenance"], default=str)[:2000])
    if report.get("config"):
        model = report["config"].get("model", {})
        lines.append(
            f"model       {model.get('num_layers')} layers, hidden {model.get('hidden_size')}, "
            f"{model.get('num_moe_experts')} experts; recipe {report['config'].get('recipe', '?')}"
        )
    if report.get("tensors"):
        width = max(len(t["name"]) for t in report["tensors"])
        lines.append("")
        for t in report["tensors"]:
            lines.append(f"  {t['name']:<{width}}  {tuple(t['shape'])!s:<22} {t['dtype']:<9} {t['sharding']}")
    lines.append("")
    if report["problems"]:
        lines.append("PROBLEMS:")
        lines += [f"  - {p}" for p in report["problems"]]
    else:
        lines.append("OK: complete")
    return "\n".join(lines)
