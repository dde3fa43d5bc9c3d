"""Build the model on the meta device (or the GPU), wrap it with Megatron-FSDP, and build the optimizer.

Order: model (meta device; the vision tower directly on the GPU) -> freeze switches -> Megatron-FSDP wrap
through megatron-core's adapter with decoder layers and vision blocks as FSDP units (the wrap materialises meta
parameters unit by unit and shards them) -> Megatron's distributed optimizer over the sharded fp32 main weights
-> learning-rate schedule -> optionally torch.compile of the units' computation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallelConfig, FullyShardedDataParallel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.transformer_layer import TransformerLayer
from vlm_fsdp.config.run import Config
from vlm_fsdp.model.compat import fix_single_rank_gradient_reduction
from vlm_fsdp.model.compile import compile_units
from vlm_fsdp.model.qwen3_vl import Qwen3VLMoe, apply_freezing
from vlm_fsdp.model.transformer_config import transformer_config
from vlm_fsdp.model.vision import VisionBlock


@dataclass
class Trainable:
    wrapped: FullyShardedDataParallel
    model: Qwen3VLMoe
    optimizer: object
    scheduler: OptimizerParamScheduler
    compiled_graphs: Callable[[], int] | None
    """Graphs compiled so far when `train.compile` is on."""


def ddp_config(config: Config) -> DistributedDataParallelConfig:
    d = config.ddp
    return DistributedDataParallelConfig(
        use_megatron_fsdp=True,
        use_distributed_optimizer=bool(d.use_distributed_optimizer),
        data_parallel_sharding_strategy=d.data_parallel_sharding_strategy,
        outer_dp_sharding_strategy=d.outer_dp_sharding_strategy,
        num_distributed_optimizer_instances=d.num_distributed_optimizer_instances,
        overlap_grad_reduce=bool(d.overlap_grad_reduce),
        overlap_param_gather=bool(d.overlap_param_gather),
        grad_reduce_in_fp32=d.grad_reduce_in_fp32,
        fsdp_double_buffer=d.fsdp_double_buffer,
        nccl_ub=d.nccl_ub,
        check_for_nan_in_grad=True,
        # the in-place scaling that fix_single_rank_gradient_reduction relies on
        gradient_reduce_div_fusion=False,
    )


def build(config: Config, device: torch.device) -> Trainable:
    m, o = config.model, config.optimizer
    meta = bool(m.init_model_with_meta_device)
    tc = transformer_config(m, on_meta_device=meta)
    # the dummy vision pass keeps collectives in step only where another rank may be running the tower
    others_see_images = parallel_state.get_data_parallel_world_size() > 1 and not config.data.text_only
    with torch.device("meta") if meta else torch.device(device):
        model = Qwen3VLMoe(tc, m, vision_device=device, vision_without_images=others_see_images)
    apply_freezing(model, m)
    wrapped = FullyShardedDataParallel(
        config=tc,
        ddp_config=ddp_config(config),
        module=model,
        fsdp_unit_modules=[TransformerLayer, VisionBlock],
        device=device,
    )
    fix_single_rank_gradient_reduction(
        wrapped, config.ddp.data_parallel_sharding_strategy, parallel_state.get_data_parallel_world_size()
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=o.lr,
            min_lr=o.min_lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            clip_grad=o.clip_grad,
            bf16=m.bf16,
            params_dtype=tc.params_dtype,
            use_distributed_optimizer=True,
        ),
        [wrapped],
        use_gloo_process_groups=False,
    )
    if device.type == "cuda":
        use_fused_adam(optimizer)
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


def use_fused_adam(optimizer) -> None:
    """Switch Megatron's fallback optimizer (torch's AdamW, used when neither Transformer Engine nor Apex is
    installed) from its multi-tensor implementation, whose temporaries add 4 bytes per parameter at the step,
    to torch's single-kernel fused one. Set before the first step, when the optimizer state is created."""
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = part.optimizer
        if type(inner) is torch.optim.AdamW:
            for group in (inner.defaults, *inner.param_groups):
                group["fused"], group["foreach"] = True, False
