"""Build what a run trains: the model, wrapped with Megatron-FSDP, its optimizer and learning-rate schedule.

Order: model (meta device; the vision tower directly on the GPU, initialised by transformers from the seeded RNG,
the same on every rank) -> layout-independent initialisation of the language model (`vlm_fsdp.model.init`) ->
freeze switches -> Megatron-FSDP wrap and distributed optimizer
(`vlm_fsdp.train.parallel`, which materialises meta parameters unit by unit and shards them) -> learning-rate
schedule -> optionally torch.compile of the units' computation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.distributed import FullyShardedDataParallel
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from vlm_fsdp.config.run import Config, frozen_parts
from vlm_fsdp.model.compile import compile_units
from vlm_fsdp.model.init import initialise, seed_initialisation
from vlm_fsdp.model.qwen3_vl import Qwen3VLMoe, apply_freezing
from vlm_fsdp.model.transformer_config import transformer_config
from vlm_fsdp.train.parallel import build_optimizer, wrap


@dataclass
class Trainable:
    wrapped: FullyShardedDataParallel
    model: Qwen3VLMoe
    optimizer: object
    scheduler: OptimizerParamScheduler
    compiled_graphs: Callable[[], int] | None
    """Graphs compiled so far when `train.compile` is on."""


def build(config: Config, device: torch.device) -> Trainable:
    m, o = config.model, config.optimizer
    meta = bool(m.init_model_with_meta_device)
    tc = transformer_config(m, on_meta_device=meta)
    # the dummy vision pass keeps collectives in step only where another rank may be running the tower
    others_see_images = parallel_state.get_data_parallel_world_size() > 1 and not config.data.text_only
    with torch.device("meta") if meta else torch.device(device):
        model = Qwen3VLMoe(tc, m, vision_device=device, vision_without_images=others_see_images)
    seed_initialisation(model.language_model, config.train.seed)
    if not meta:
        initialise(model.language_model)
    apply_freezing(model, frozen_parts(config))
    wrapped = wrap(model, tc, config, device)
    optimizer = build_optimizer(wrapped, config, tc, device)
    iters = config.train.train_iters
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.lr_warmup_iters,
        lr_decay_steps=o.lr_decay_iters or iters,
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=iters,
        wd_incr_style="constant",
    )
    compiled_graphs = compile_units(model) if config.train.compile else None
    return Trainable(
        wrapped=wrapped, model=model, optimizer=optimizer, scheduler=scheduler, compiled_graphs=compiled_graphs
    )
