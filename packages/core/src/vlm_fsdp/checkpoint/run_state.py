"""The non-tensor part of a training state, stored as tensors so that loading a checkpoint never unpickles anything:
JSON text as a uint8 tensor (the step, the schedule, the data position, Python's and numpy's RNG states), and
PyTorch's RNG states as the byte tensors they are."""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import torch


def json_tensor(value: Any) -> torch.Tensor:
    """`value` (JSON-serialisable) as a uint8 tensor of its UTF-8 JSON text."""
    return torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8).clone()


def from_json_tensor(tensor: torch.Tensor) -> Any:
    return json.loads(bytes(tensor.cpu().numpy().tobytes()).decode())


def rng_tensors() -> dict[str, torch.Tensor]:
    """This process's RNG states: Python's, numpy's, torch's CPU generator and, with CUDA, the device's and
    Megatron-Core's tracked CUDA generators (`tracker/<name>`)."""
    version, state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    out = {
        "python": json_tensor([version, list(state), gauss]),
        "numpy": json_tensor([kind, keys.tolist(), position, has_gauss, cached]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        out["cuda"] = torch.cuda.get_rng_state()
        out |= {f"tracker/{name}": s for name, s in get_cuda_rng_tracker().get_states().items()}
    return out


def set_rng_tensors(states: dict[str, torch.Tensor]) -> None:
    version, state, gauss = from_json_tensor(states["python"])
    random.setstate((version, tuple(state), gauss))
    kind, keys, position, has_gauss, cached = from_json_tensor(states["numpy"])
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        torch.cuda.set_rng_state(states["cuda"])
        tracked = {k.removeprefix("tracker/"): v for k, v in states.items() if k.startswith("tracker/")}
        get_cuda_rng_tracker().set_states(tracked)
