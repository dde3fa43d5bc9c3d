"""Initial weights that do not depend on the parallel layout.

Megatron-FSDP materialises a meta-device model one parameter group at a time, in an order that changes with the
layout (under expert parallelism the experts form groups of their own), and each expert-parallel rank holds only
a slice of the experts. Drawing every module's weights from one shared RNG stream would therefore give other
weights on other layouts. Instead every language-model module's `reset_parameters` runs with an RNG seeded from
the run's seed and the module's name, and `GroupedExperts` seeds each expert from its global index: a seed gives
the same model on one GPU, on many, with or without a meta device, under any expert-parallel size. (The vision
tower is never on the meta device: transformers initialises it from the seeded RNG before anything else is built,
identically on every rank.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def derive_seed(seed: int, name: str) -> int:
    """A 63-bit seed for the thing called `name`, from the run's seed."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1


@contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Draw from generators seeded with `seed` (the CPU's, and `device`'s when it is a GPU); the previous RNG
    states are restored afterwards."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.random.default_generator.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
        yield


def _owners(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    for name, module in model.named_modules():
        if next(module.parameters(recurse=False), None) is not None:
            yield name, module


def seed_initialisation(model: torch.nn.Module, seed: int) -> None:
    """Make every module that owns parameters initialise them from its own seed whenever `reset_parameters` is
    called (by Megatron-FSDP while it materialises a meta-device model, or by `initialise`)."""
    for name, module in _owners(model):
        reset, module_seed = module.reset_parameters, derive_seed(seed, name)

        def seeded_reset(reset=reset, module=module, module_seed=module_seed) -> None:
            with seeded_rng(module_seed, next(module.parameters(recurse=False)).device):
                reset()

        module.reset_parameters = seeded_reset


@torch.no_grad()
def initialise(model: torch.nn.Module) -> None:
    """(Re)initialise a model built on a real device the way a meta-device build is materialised."""
    for _, module in _owners(model):
        module.reset_parameters()
