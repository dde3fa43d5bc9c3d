"""Write a model-only DCP checkpoint whose tensors are produced one at a time, as the writer asks for them.

DCP plans a save from shapes alone, so the state dict handed to it holds meta tensors; the planner then calls
each tensor's producer only when the writer reaches it. Peak memory is one producer's tensors (for the
converters: the q/k/v of one layer, or one layer's stacked experts), not the model. The output is written under
the lock of `layout.writing` and made visible by `layout.finalize`; on any error, Ctrl-C included, nothing of it
is left behind.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter
from tqdm import tqdm
from vlm_fsdp.checkpoint.layout import RUN_RECORD, finalize, writing
from vlm_fsdp.checkpoint.safe_reader import dcp_errors, single_process
from vlm_fsdp.errors import UserError

Producer = Callable[[], torch.Tensor]


class _StreamingPlanner(DefaultSavePlanner):
    def __init__(self, producers: dict[str, Producer], metas: dict[str, torch.Tensor], progress: tqdm) -> None:
        super().__init__()
        self.producers = producers
        self.metas = metas
        self.progress = progress

    def resolve_data(self, write_item):
        fqn = write_item.index.fqn
        if fqn not in self.producers:
            return super().resolve_data(write_item)
        tensor = self.producers[fqn]()
        meta = self.metas[fqn]
        if tensor.shape != meta.shape or tensor.dtype != meta.dtype:
            raise UserError(f"{fqn} came out as {tensor.dtype} {list(tensor.shape)} instead of the planned "
                            f"{meta.dtype} {list(meta.shape)}: its source is damaged")  # fmt: skip
        self.progress.update(1)
        return tensor


def write_streaming(out: Path, tensors: dict[str, tuple[torch.Tensor, Producer]], record: dict[str, Any], *,
                    point_latest: bool, progress: bool = True) -> Path:  # fmt: skip
    """Write `{"model": {name: tensor}}` to `out` (under `.partial`, locked, renamed when complete) with `record`
    as its run.yaml; `tensors` maps each name to (meta tensor of its shape and dtype, producer of its value)."""
    state = {name: meta for name, (meta, _) in tensors.items()}
    producers = {f"model.{name}": produce for name, (_, produce) in tensors.items()}
    metas = {f"model.{name}": meta for name, (meta, _) in tensors.items()}
    with (
        writing(out) as partial,
        tqdm(total=len(producers), desc="convert", unit="tensor", disable=not progress) as bar,
    ):
        with dcp_errors(f"writing {partial}"), single_process():
            dcp.save({"model": state}, storage_writer=FileSystemWriter(partial, thread_count=1),
                     planner=_StreamingPlanner(producers, metas, bar), no_dist=True)  # fmt: skip
        (partial / RUN_RECORD).write_text(yaml.safe_dump(record, sort_keys=False))
        finalize(partial, out, point_latest=point_latest, replace=False)
    return out
