"""Shared by the CPU and GPU tests: the model tensors of a checkpoint directory, read in this process."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from vlm_fsdp.checkpoint.safe_reader import load_tensors, read_metadata


def model_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every `model.<name>` tensor of the checkpoint, by our name, as a plain CPU tensor."""
    metadata = read_metadata(checkpoint)
    state = {
        "model": {
            k.removeprefix("model."): torch.empty(tuple(m.size), dtype=m.properties.dtype)
            for k, m in metadata.state_dict_metadata.items()
            if k.startswith("model.") and isinstance(m, TensorStorageMetadata)
        }
    }
    load_tensors(state, checkpoint, metadata=metadata, no_dist=True)
    return state["model"]
