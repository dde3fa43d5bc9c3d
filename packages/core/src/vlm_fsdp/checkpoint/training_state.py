"""Save and restore everything a run needs to continue exactly, as one DCP checkpoint per step.

The DCP state holds, under global names and shapes (`vlm_fsdp.checkpoint.sharding`, so a checkpoint loads at any
number of ranks and any expert-parallel layout):
- `model.<name>`: the parameters by our names, the fp32 main weights Megatron-FSDP trains, every expert once;
- `optimizer.state.<name>.{exp_avg,exp_avg_sq,step}`: AdamW's state of each parameter, merged over Megatron's
  chained optimizers (dense and expert parameters have one each under expert parallelism), with the one step count
  of the run; the parameter groups' settings come from the config and the `scheduler`, not from the checkpoint;
- `scheduler`, `step`, `data` (the loader position, independent of the number of ranks) and `rng/<rank>/...`
  (each rank's RNG states; a rank without one, on a larger layout, keeps its fresh seed), all as tensors
  (`vlm_fsdp.checkpoint.run_state`): loading a checkpoint unpickles nothing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from megatron.core import parallel_state
from vlm_fsdp.checkpoint.checksums import write_checksums
from vlm_fsdp.checkpoint.layout import RUN_RECORD, finalize, iteration_dir, prune
from vlm_fsdp.checkpoint.parallel_io import locked_partial, own_file_digests, verify
from vlm_fsdp.checkpoint.run_state import from_json_tensor, json_tensor, rng_tensors, set_rng_tensors
from vlm_fsdp.checkpoint.safe_reader import dcp_errors, load_tensors, read_metadata
from vlm_fsdp.checkpoint.sharding import global_view
from vlm_fsdp.errors import UserError
from vlm_fsdp.model.experts import GroupedExperts

OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fsdp_dtensor"}


def model_key(name: str) -> str:
    """Our name of a parameter of the wrapped model (the FSDP wrappers add `module.` prefixes)."""
    return re.sub(r"^(module\.)+", "", name)


def model_state(wrapped) -> dict[str, Any]:
    return {model_key(k): v for k, v in wrapped.state_dict().items() if not k.endswith("_extra_state")}


def as_global(tree: dict, model) -> dict:
    """`tree` with every sharded tensor as a view of its global tensor; expert tensors are told apart by name."""
    experts = {
        f"{name}.{param}"
        for name, module in model.named_modules()
        if isinstance(module, GroupedExperts)
        for param, _ in module.named_parameters(recurse=False)
    }
    return global_view(
        tree,
        is_expert=lambda path: any(model_key(part) in experts for part in path),
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
        ep_size=parallel_state.get_expert_model_parallel_world_size(),
    )


def _optimizer_parts(optimizer, *, loading: bool) -> list[dict]:
    """Megatron's fsdp_dtensor state dict of each chained optimizer (`{"state": {name: {...}}, ...}`). It names
    parameters by the modules' current ones, so the model's sharded parameters must be in the modules: the model's
    `state_dict()` puts them back (the optimizer step leaves the gathered ones there for the next forward)."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [p.sharded_state_dict({}, is_loading=loading, metadata=OPTIMIZER_METADATA) for p in parts]


def _optimizer_state(parts: list[dict]) -> dict[str, dict]:
    """The per-parameter states of all parts under our names (the same dicts, so loading into them fills the
    parts)."""
    return {model_key(name): state for part in parts for name, state in part["state"].items()}


def _run_step_count(states: dict[str, dict], device: torch.device) -> torch.Tensor:
    """AdamW's step count of the run: the largest over every parameter and rank. A parameter whose shard on this
    rank is empty never steps here, so its own count stays 0."""
    local = torch.stack([s["step"].to(device, torch.float32) for s in states.values()]).max()
    torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.MAX)
    return local


def save(*, save_dir: Path, step: int, trainable, loader_state: dict, run_record: str, keep: int, rank: int) -> Path:
    """Write the checkpoint of `step` atomically (every rank calls this): under `.partial`, locked against a second
    writer, with per-file checksums; returns its directory."""
    final = iteration_dir(save_dir, step)
    with locked_partial(final) as partial:
        torch.distributed.barrier()
        model = model_state(trainable.wrapped)  # first: see `_optimizer_parts`
        states = _optimizer_state(_optimizer_parts(trainable.optimizer, loading=False))
        steps = _run_step_count(states, next(iter(states.values()))["exp_avg"].device)
        states = {name: {**state, "step": steps.to(state["step"].device)} for name, state in states.items()}
        sharded = as_global({"model": model, "optimizer": {"state": states}}, trainable.model)
        state = sharded | {
            "scheduler": json_tensor(trainable.scheduler.state_dict()),
            "step": torch.tensor(step, dtype=torch.int64),
            "data": json_tensor(loader_state),
            f"rng/{rank}": rng_tensors(),
        }
        with dcp_errors(f"writing {partial}"):
            dcp.save(state, checkpoint_id=partial)
        torch.distributed.barrier()
        digests = own_file_digests(partial, rank)
        if rank == 0:
            (partial / RUN_RECORD).write_text(run_record)
            write_checksums(partial, known=digests)
            finalize(partial, final, checksums=False)
            prune(save_dir, keep)
    torch.distributed.barrier()
    return final


def checkpoint_metadata(path: Path) -> dict[str, Any]:
    """What the checkpoint holds: DCP key -> its storage metadata (shape and dtype of a tensor), read without
    unpickling anything but DCP's metadata classes."""
    return read_metadata(path).state_dict_metadata


def _empty_like_saved(metadata: dict[str, Any], keys: list[str]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(tuple(metadata[k].size), dtype=metadata[k].properties.dtype) for k in keys}


def _flat_keys(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out += _flat_keys(value, f"{name}.") if isinstance(value, dict) else [name]
    return out


def _require(path: Path, tree: dict, keys: set[str], what: str, hint: str = "") -> None:
    missing = sorted(k for k in _flat_keys(tree) if k not in keys)
    if missing:
        raise UserError(
            f"checkpoint {path} lacks {len(missing)} {what}, e.g. {missing[:3]}: it was written for another "
            f"architecture or by an older vlm-fsdp (compare with `vlm-fsdp inspect`){hint}"
        )


def load_model(path: Path, trainable) -> None:
    """Load only the model parameters (a training checkpoint, or one made by `vlm-fsdp convert`), after checking
    its files against their checksums."""
    verify(path)
    state = as_global({"model": model_state(trainable.wrapped)}, trainable.model)
    _require(path, state, set(checkpoint_metadata(path)), "model tensors")
    load_tensors(state, path)
    _install(trainable.wrapped)


def load(path: Path, trainable, rank: int) -> tuple[int, dict]:
    """Restore a full training state, written at any layout, after checking its files against their checksums;
    returns (step, loader state)."""
    verify(path)
    metadata = checkpoint_metadata(path)
    keys = set(metadata)
    if "step" not in keys:
        raise UserError(
            f"{path} holds model weights only (no optimizer or step): start from it with "
            f"checkpoint.load={path} instead of --resume"
        )
    model = model_state(trainable.wrapped)  # first: see `_optimizer_parts`
    parts = _optimizer_parts(trainable.optimizer, loading=True)
    sharded = as_global({"model": model, "optimizer": {"state": _optimizer_state(parts)}}, trainable.model)
    _require(
        path,
        sharded,
        keys,
        "model or optimizer tensors",
        # a run that trained fewer parts saved no optimizer state for the others
        "; or by a run that left other parts untrained (model.freeze_*, data.text_only): start from its weights "
        f"with checkpoint.load={path} instead of --resume",
    )
    _require(path, {"scheduler": 0, "data": 0}, keys, "run states")
    state = sharded | _empty_like_saved(metadata, ["scheduler", "step", "data"])
    rng = [k for k in keys if k.startswith(f"rng/{rank}.")]
    state |= _empty_like_saved(metadata, rng)
    load_tensors(state, path)
    _install(trainable.wrapped)
    for optimizer, part in zip(getattr(trainable.optimizer, "chained_optimizers", [trainable.optimizer]), parts,
                               strict=True):  # fmt: skip
        optimizer.load_state_dict(part)
    trainable.scheduler.load_state_dict(from_json_tensor(state["scheduler"]))
    if rng:
        set_rng_tensors({k.removeprefix(f"rng/{rank}."): state[k] for k in rng})
    return int(state["step"]), from_json_tensor(state["data"])


def _install(wrapped) -> None:
    """Refresh the bf16 compute weights from the loaded fp32 main weights."""
    fsdp = wrapped.module
    if hasattr(fsdp, "install_optimized_model_weights"):
        fsdp.install_optimized_model_weights()
