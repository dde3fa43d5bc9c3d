"""Messages megatron-core 0.16.1 prints on every run without Transformer Engine and Apex that ask for no action:
its fallbacks to PyTorch (which `vlm_fsdp.model.compat` replaces where they are slow), a deprecated default of
its config, and "Unknown MLP type" for our MoE layer spec. `silence()` drops exactly these (call it before
megatron-core is imported); a run prints `NOTICE` once instead.
"""

from __future__ import annotations

import logging
import warnings

NOTICE = (
    "Megatron-Core runs without Transformer Engine and Apex: its PyTorch fallbacks are in use "
    "(vlm_fsdp/model/compat.py replaces the slow ones)"
)
_WARNINGS = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"full scope is deprecated",
)


class _DropUnknownMlpType(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unknown MLP type")


def silence() -> None:
    for message in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_DropUnknownMlpType())
