"""`vlm-fsdp inspect`: what a checkpoint holds, and what is wrong with it when it is incomplete or corrupt.

Nothing in the checkpoint is trusted: its files are checked against their checksums, `.metadata` is read by the
restricted reader of `vlm_fsdp.checkpoint.safe_reader`, `run.yaml` with YAML's safe loader, and every
inconsistency is listed as a problem (exit status 1) rather than raised.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata
from vlm_fsdp.checkpoint.checksums import CHECKSUMS, checksum_problems
from vlm_fsdp.checkpoint.hf_import import checkpoint_tensor_problems
from vlm_fsdp.checkpoint.layout import METADATA, PARTIAL, RUN_RECORD, complete_checkpoints, latest_checkpoint
from vlm_fsdp.checkpoint.safe_reader import load_tensors, read_metadata, read_objects, storage_problems
from vlm_fsdp.convert.records import model_config
from vlm_fsdp.errors import UserError

_RNG = re.compile(r"^rng/(\d{1,9})(\.|$)")
_NUMBER_DTYPES = (torch.int64, torch.int32)
# how much of run.yaml's provenance and config a report carries: YAML anchors can make a tiny file a huge tree
_MAX_NODES, _MAX_DEPTH = 20_000, 32


def _plain(value: Any, budget: list[int], depth: int = 0) -> Any:
    """`value` as JSON-ready data (str keys, lists, numbers, strings), cut short where it is too large or deep."""
    budget[0] -= 1
    if budget[0] < 0 or depth > _MAX_DEPTH:
        return "..."
    if isinstance(value, dict):
        return {str(k)[:200]: _plain(v, budget, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, budget, depth + 1) for v in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return str(value)[:4096]


def _sharding(meta: TensorStorageMetadata) -> str:
    chunks = meta.chunks
    if len(chunks) == 1:
        return "1 piece"
    split = sorted({dim for c in chunks for dim, off in enumerate(c.offsets) if off})
    return f"{len(chunks)} pieces split along dim {', '.join(map(str, split)) or '?'}"


def _format(path: Path) -> str:
    megatron = path / "metadata.json"
    if megatron.is_file() and "torch_dist" in megatron.read_bytes()[:65536].decode("utf-8", errors="replace"):
        return "torch_dist"
    return "fsdp_dtensor"


def _checksums(path: Path, problems: list[str], *, verify: bool, progress: bool) -> str:
    if not verify:
        return "not verified (--no-verify)"
    found = checksum_problems(path, progress=progress)
    if found is None:
        return f"none (no {CHECKSUMS}: written before vlm-fsdp recorded them)"
    problems += found
    return "MISMATCH" if found else "verified"


def _step(path: Path, metadata: Metadata) -> int:
    """The step a training checkpoint records: a tensor, or a plain number in older checkpoints."""
    meta = metadata.state_dict_metadata["step"]
    if isinstance(meta, TensorStorageMetadata):
        if meta.size.numel() != 1 or meta.properties.dtype not in _NUMBER_DTYPES:
            raise UserError(f"step is a {meta.properties.dtype} tensor of shape {list(meta.size)}, not one number")
        state = {"step": torch.empty(tuple(meta.size), dtype=meta.properties.dtype)}
        load_tensors(state, path, metadata=metadata, no_dist=True)
        return int(state["step"].item())
    step = read_objects(path, ["step"])["step"]
    if not isinstance(step, int) or isinstance(step, bool):
        raise UserError(f"step is a {type(step).__name__}, not a number")
    return step


def _describe_record(path: Path, report: dict[str, Any], metadata: Metadata | None) -> None:
    """Provenance and config from run.yaml, and whether the model tensors are the ones that config needs."""
    record_path = path / RUN_RECORD
    if not record_path.is_file():
        report["problems"].append(f"no {RUN_RECORD}: the config and provenance of this checkpoint are unknown")
        return
    try:
        record = yaml.safe_load(record_path.read_bytes()) or {}
    except (OSError, ValueError, yaml.YAMLError) as err:
        report["problems"].append(f"{RUN_RECORD} is damaged: it is not readable YAML ({str(err)[:200]})")
        return
    if not isinstance(record, dict):
        report["problems"].append(f"{RUN_RECORD} is damaged: it holds a {type(record).__name__}, not settings")
        return
    budget = [_MAX_NODES]
    report["provenance"] = _plain(record.get("provenance") or record.get("source"), budget)
    report["config"] = _plain({k: v for k, v in record.items() if k not in ("provenance", "source")}, budget)
    try:
        model = model_config(record)
    except UserError as err:
        report["problems"].append(f"{RUN_RECORD} holds no valid model config: {err}")
        return
    if metadata is not None:
        report["problems"] += checkpoint_tensor_problems(metadata, model)


def _list_entries(metadata: Metadata, report: dict[str, Any]) -> None:
    """Put the tensors, the parameter count and the ranks with RNG state in the report."""
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
    ranks = {int(m.group(1)) for name in metadata.state_dict_metadata if (m := _RNG.match(name))}
    report["ranks_with_rng_state"] = sorted(ranks)


def _resolve_save_dir(path: Path, report: dict[str, Any]) -> Path | None:
    """The checkpoint to inspect in a save directory (its latest complete one), or None when it has none."""
    found = complete_checkpoints(path)
    partial = sorted(p.name for p in path.glob(f"*{PARTIAL}"))
    report["checkpoints"] = [p.name for p in found]
    if partial:
        report["problems"].append(f"interrupted saves (never loaded): {', '.join(partial)}")
    latest = latest_checkpoint(path)
    if latest is None:
        report["problems"].append(f"no complete checkpoint in {path} (none has {METADATA})")
        report["format"] = "unknown"
        return None
    report["latest"] = latest.name
    report["path"] = str(latest)
    return latest


def inspect_checkpoint(path: Path, *, verify: bool = True, progress: bool = True) -> dict[str, Any]:
    """A report of the checkpoint at `path` (a checkpoint directory or a save directory of several); `verify`:
    check its files against their checksums."""
    report: dict[str, Any] = {"path": str(path), "problems": []}
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if not path.is_dir():
        raise UserError(f"{path} is a file: expected a checkpoint directory or a save directory")
    if not (path / METADATA).exists() and not path.name.endswith(PARTIAL):
        path = _resolve_save_dir(path, report)
        if path is None:
            return report
    if path.name.endswith(PARTIAL) or not (path / METADATA).is_file():
        report["format"] = "incomplete"
        report["problems"].append(
            f"{path.name} is incomplete: the save was interrupted before {METADATA} was "
            "written, so no tensor in it can be trusted"
        )
        return report
    report["checksums"] = _checksums(path, report["problems"], verify=verify, progress=progress)
    try:
        metadata = read_metadata(path)
    except UserError as err:
        report["format"] = "unreadable"
        report["problems"].append(str(err))
        _describe_record(path, report, None)
        return report
    report["format"] = _format(path)
    report["problems"] += storage_problems(path, metadata)
    _list_entries(metadata, report)
    if not report["problems"] and "step" in metadata.state_dict_metadata:
        try:
            report["step"] = _step(path, metadata)
        except UserError as err:
            report["problems"].append(f"the step cannot be read: {err}")
    _describe_record(path, report, metadata)
    return report


def render(report: dict[str, Any]) -> str:
    lines = [f"checkpoint  {report['path']}", f"format      {report.get('format', 'unknown')}"]
    if "checkpoints" in report:
        lines.append(f"in folder   {', '.join(report['checkpoints']) or 'none'} (latest: {report.get('latest')})")
    if "step" in report:
        lines.append(f"step        {report['step']}")
    if "parameters" in report:
        lines.append(f"parameters  {report['parameters']:,}")
    if "checksums" in report:
        lines.append(f"checksums   {report['checksums']}")
    if report.get("ranks_with_rng_state"):
        lines.append(f"written by  {len(report['ranks_with_rng_state'])} rank(s)")
    if report.get("provenance"):
        lines.append("provenance  " + json.dumps(report["provenance"], default=str)[:2000])
    config = report.get("config")
    if isinstance(config, dict) and config:
        model = config.get("model") if isinstance(config.get("model"), dict) else {}
        lines.append(
            f"model       {model.get('num_layers')} layers, hidden {model.get('hidden_size')}, "
            f"{model.get('num_moe_experts')} experts; recipe {config.get('recipe', '?')}"
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
