"""Save and restore everything a run needs to continue exactly, as one DCP checkpoint per step.

The DCP state holds `model` (parameters by our names, sharded DTensors: the fp32 main weights Megatron-FSDP
trains), `optimizer` (Megatron's distributed optimizer state in its fsdp_dtensor form), `scheduler`, `step`,
`data` (the loader position as JSON, independent of the number of ranks) and `rng/<rank>` (each rank's RNG
states, pickled: DCP stores such opaque values whole instead of walking into them).
"""

from __future__ import annotations

import json
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from vlm_fsdp.checkpoint.layout import PARTIAL, RUN_RECORD, finalize, iteration_dir, prune
from vlm_fsdp.errors import UserError

OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fsdp_dtensor"}


def model_key(name: str) -> str:
    """Our name of a parameter of the wrapped model (the FSDP wrappers add `module.` prefixes)."""
    return re.sub(r"^(module\.)+", "", name)


def model_state(wrapped) -> dict[str, Any]:
    return {model_key(k): v for k, v in wrapped.state_dict().items() if not k.endswith("_extra_state")}


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        state["cuda"] = torch.cuda.get_rng_state()
        state["cuda_tracker"] = get_cuda_rng_tracker().get_states()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        torch.cuda.set_rng_state(state["cuda"])
        get_cuda_rng_tracker().set_states(state["cuda_tracker"])


def save(*, save_dir: Path, step: int, trainable, loader_state: dict, run_record: str, keep: int, rank: int) -> Path:
    """Write the checkpoint of `step` atomically; returns its directory."""
    final = iteration_dir(save_dir, step)
    partial = final.with_name(final.name + PARTIAL)
    if rank == 0:
        partial.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    state = {
        "model": model_state(trainable.wrapped),
        "optimizer": trainable.optimizer.sharded_state_dict({}, metadata=OPTIMIZER_METADATA),
        "scheduler": trainable.scheduler.state_dict(),
        "step": step,
        "data": json.dumps(loader_state),
        f"rng/{rank}": pickle.dumps(rng_state()),
    }
    dcp.save(state, checkpoint_id=partial)
    torch.distributed.barrier()
    if rank == 0:
        (partial / RUN_RECORD).write_text(run_record)
        finalize(partial, final)
        prune(save_dir, keep)
    torch.distributed.barrier()
    return final


def checkpoint_keys(path: Path) -> set[str]:
    return set(FileSystemReader(path).read_metadata().state_dict_metadata)


def load_model(path: Path, wrapped) -> None:
    """Load only the model parameters (a training checkpoint, or one made by `vlm-fsdp convert`)."""
    state = model_state(wrapped)
    missing = sorted(f"model.{k}" for k in state if f"model.{k}" not in checkpoint_keys(path))
    if missing:
        raise UserError(
            f"checkpoint {path} lacks {len(missing)} model tensors, e.g. {missing[:3]}: it was written "
            "for another architecture (compare with `vlm-fsdp inspect`)"
        )
    dcp.load({"model": state}, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True))
    _install(wrapped, state)


def load(path: Path, trainable, rank: int) -> tuple[int, dict]:
    """Restore a full training state; returns (step, loader state)."""
    keys = checkpoint_keys(path)
    if "step" not in keys:
        raise UserError(
            f"{path} holds model weights only (no optimizer or step): start from it with "
            f"checkpoint.load={path} instead of --resume"
        )
    model = model_state(trainable.wrapped)
    state = {
        "model": model,
        "optimizer": trainable.optimizer.sharded_state_dict({}, is_loading=True, metadata=OPTIMIZER_METADATA),
        "scheduler": trainable.scheduler.state_dict(),
        "step": 0,
        "data": "",
    }
    rng_key = f"rng/{rank}"
    if rng_key in keys:
        state[rng_key] = b""
    dcp.load(state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True))
    _install(trainable.wrapped, model)
    trainable.optimizer.load_state_dict(state["optimizer"])
    trainable.scheduler.load_state_dict(state["scheduler"])
    if rng_key in state:
        set_rng_state(pickle.loads(state[rng_key]))
    return int(state["step"]), json.loads(state["data"])


def _install(wrapped, loaded: dict[str, Any]) -> None:
    """Copy loaded values into the parameters they belong to, then refresh the bf16 compute weights."""
    with torch.no_grad():
        for key, value in model_state(wrapped).items():
            if value is not loaded[key]:
                value.copy_(loaded[key])
    fsdp = wrapped.module
    if hasattr(fsdp, "install_optimized_model_weights"):
        fsdp.install_optimized_model_weights()
