"""Checks that a resolved config describes a model and layout that can run, with the reason when not.

First every field against its type and the bounds declared next to it (`vlm_fsdp.config.fields`); then, only
when those hold (the checks below divide by sizes and compare them), the combinations of fields and the layout.
"""

from __future__ import annotations

from vlm_fsdp.config.fields import field_problems, shorten
from vlm_fsdp.config.model import MAX_GPUS
from vlm_fsdp.config.run import Config, frozen_parts
from vlm_fsdp.errors import ConfigError

# parallel splits the model code does not implement, and why
UNSPLIT = {
    "tensor_model_parallel_size": "the vision tower (transformers') and the grouped experts are not tensor-parallel",
    "context_parallel_size": "the packed-sequence attention does not split sequences across ranks",
    "expert_tensor_parallel_size": "the grouped experts are not tensor-parallel",
}


def problems(config: Config, world_size: int | None = None) -> list[str]:
    """Every reason the config cannot run (on `world_size` GPUs, when given); empty when it can."""
    out = field_problems(config)
    if out:
        return out
    out += backend_problems(config) + architecture_problems(config) + training_problems(config)
    out += data_problems(config)
    if world_size is not None:
        out += layout_problems(config, world_size)
    return out


def backend_problems(config: Config) -> list[str]:
    """Settings this trainer does not implement: it trains with Megatron-FSDP and expert parallelism only."""
    m, ddp, out = config.model, config.ddp, []
    if not config.dist.use_megatron_fsdp:
        out.append("dist.use_megatron_fsdp=false: vlm-fsdp trains with Megatron-FSDP only")
    if config.dist.use_torch_fsdp2:
        out.append("dist.use_torch_fsdp2=true: PyTorch FSDP2 is not supported; vlm-fsdp trains with Megatron-FSDP")
    if config.checkpoint.ckpt_format == "torch_dist":
        out.append(
            "checkpoint.ckpt_format=torch_dist cannot save Megatron-FSDP's sharded parameters; use "
            "fsdp_dtensor (convert existing torch_dist checkpoints with `vlm-fsdp convert torch-dist-to-fsdp`)"
        )
    if m.pipeline_model_parallel_size > 1:
        out.append(
            "Megatron-FSDP does not support pipeline parallelism: set model.pipeline_model_parallel_size=1 "
            "(shard with FSDP and expert parallelism instead)"
        )
    for name, what in UNSPLIT.items():
        if getattr(m, name) > 1:
            out.append(
                f"model.{name}={getattr(m, name)} is not implemented: {what}; set it to 1 and shard with "
                "Megatron-FSDP and model.expert_model_parallel_size instead"
            )
    if ddp.data_parallel_sharding_strategy == "optim":
        out.append(
            "ddp.data_parallel_sharding_strategy=optim gives wrong gradients on more than one rank in megatron-core "
            "0.16.1 (a rank's own gradients are added to the reduced ones); use optim_grads, which shards the "
            "optimizer state the same way and the gradients too"
        )
    if ddp.outer_dp_sharding_strategy != "no_shard":
        out.append(
            f"ddp.outer_dp_sharding_strategy={ddp.outer_dp_sharding_strategy} is not implemented: checkpoints of "
            "optimizer state sharded over the outer groups of hybrid sharding; use no_shard (replicas across groups)"
        )
    if ddp.num_distributed_optimizer_instances > 1 and m.expert_model_parallel_size > 1:
        out.append(
            "ddp.num_distributed_optimizer_instances > 1 (hybrid sharding) with model.expert_model_parallel_size > 1: "
            "megatron-core 0.16.1's Megatron-FSDP adapter builds no expert groups for hybrid sharding; use one of them"
        )
    if m.gradient_accumulation_fusion:
        out.append(
            "model.gradient_accumulation_fusion=true does not work with Megatron-FSDP's gradient buffers; "
            "set it to false"
        )
    if not ddp.use_distributed_optimizer:
        out.append(
            "ddp.use_distributed_optimizer=false is not implemented: Megatron-FSDP trains with Megatron's distributed "
            "optimizer (set it to true; ddp.data_parallel_sharding_strategy=no_shard keeps its state unsharded)"
        )
    if m.init_model_with_meta_device and ddp.data_parallel_sharding_strategy == "no_shard":
        out.append(
            "model.init_model_with_meta_device=true needs a sharding strategy other than no_shard "
            "(Megatron-FSDP materialises meta parameters shard by shard); set it to false"
        )
    if ddp.nccl_ub and not ddp.fsdp_double_buffer:
        out.append("ddp.nccl_ub=true needs ddp.fsdp_double_buffer=true (registered buffers must be persistent)")
    return out


def architecture_problems(config: Config) -> list[str]:
    """Model sizes that do not fit together."""
    m, v, out = config.model, config.model.vision, []
    if m.num_moe_experts % m.expert_model_parallel_size:
        out.append(
            f"model.expert_model_parallel_size={m.expert_model_parallel_size} does not divide "
            f"model.num_moe_experts={m.num_moe_experts}"
        )
    if m.moe_router_topk > m.num_moe_experts:
        out.append(
            f"model.moe_router_topk={m.moe_router_topk} must be between 1 and model.num_moe_experts={m.num_moe_experts}"
        )
    if m.num_attention_heads % m.num_query_groups:
        out.append(
            f"model.num_query_groups={m.num_query_groups} does not divide "
            f"model.num_attention_heads={m.num_attention_heads}"
        )
    if sum(m.mrope_section) * 2 != m.kv_channels:
        out.append(
            f"model.mrope_section {m.mrope_section} sums to {sum(m.mrope_section)}, but must sum to "
            f"model.kv_channels / 2 = {m.kv_channels // 2}"
        )
    if v.hidden_size % v.num_heads:
        out.append(f"model.vision.num_heads={v.num_heads} does not divide model.vision.hidden_size={v.hidden_size}")
    bad = [i for i in v.deepstack_visual_indexes if not 0 <= i < v.depth]
    if bad:
        out.append(f"model.vision.deepstack_visual_indexes {bad} are outside the vision tower's 0..{v.depth - 1}")
    if len(v.deepstack_visual_indexes) > m.num_layers:
        out.append("more DeepStack features than decoder layers to add them to")
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        if not 0 <= getattr(m, name) < m.vocab_size:
            out.append(f"model.{name}={getattr(m, name)} is not below model.vocab_size={m.vocab_size}")
    if m.seq_length > m.max_position_embeddings:
        out.append(f"model.seq_length={m.seq_length} exceeds model.max_position_embeddings={m.max_position_embeddings}")
    return out


def training_problems(config: Config) -> list[str]:
    """Freezing, recompute, batch and schedule settings that do not fit together."""
    m, t, opt, out = config.model, config.train, config.optimizer, []
    frozen = frozen_parts(config)
    if frozen.language_model and frozen.vision_model and frozen.vision_projection:
        out.append(
            "every part of the model is frozen: nothing would be trained"
            + (" (data.text_only leaves the vision tower untrained)" if config.data.text_only else "")
        )
    if m.recompute_granularity == "full":
        if m.recompute_method is None or m.recompute_num_layers is None:
            out.append("model.recompute_granularity=full needs model.recompute_method and model.recompute_num_layers")
        elif not 1 <= m.recompute_num_layers <= m.num_layers:
            out.append(f"model.recompute_num_layers={m.recompute_num_layers} must be between 1 and model.num_layers")
    elif m.recompute_method is not None or m.recompute_num_layers is not None:
        out.append(
            "model.recompute_method and model.recompute_num_layers apply only with model.recompute_granularity=full"
        )
    if t.global_batch_size % t.micro_batch_size:
        out.append(
            f"train.micro_batch_size={t.micro_batch_size} does not divide train.global_batch_size={t.global_batch_size}"
        )
    if opt.min_lr > opt.lr:
        out.append(f"optimizer.min_lr={opt.min_lr:g} is larger than optimizer.lr={opt.lr:g}; it must be at most lr")
    decay = opt.lr_decay_iters or t.train_iters
    if opt.lr_warmup_iters >= decay:
        out.append(
            f"optimizer.lr_warmup_iters={opt.lr_warmup_iters} must be below the decay length {decay} "
            "(optimizer.lr_decay_iters, or train.train_iters when that is null)"
        )
    return out


def data_problems(config: Config) -> list[str]:
    """Reasons the image and batching settings of data.* do not fit the model and the batch."""
    data, v, out = config.data, config.model.vision, []
    if data.min_pixels is not None and data.max_pixels is not None and data.min_pixels > data.max_pixels:
        out.append(f"data.min_pixels={data.min_pixels} is larger than data.max_pixels={data.max_pixels}")
    factor = v.patch_size * v.spatial_merge_size
    bad = [bucket for bucket in data.image_buckets if any(side % factor for side in bucket)]
    if bad:
        out.append(
            f"data.image_buckets {shorten(bad)} are not [height, width] pairs of multiples of {factor} "
            "(model.vision.patch_size x model.vision.spatial_merge_size)"
        )
    budget = data.max_patches_per_microbatch
    if budget is not None and budget < config.train.micro_batch_size:
        out.append(
            f"data.max_patches_per_microbatch={budget} is below train.micro_batch_size={config.train.micro_batch_size}"
            ": every packed sequence gets an equal share of the budget"
        )
    return out


def layout_problems(config: Config, world_size: int) -> list[str]:
    """Reasons the parallel layout does not fit `world_size` GPUs (every GPU is a data-parallel rank)."""
    if not 1 <= world_size <= MAX_GPUS:
        return [f"the number of GPUs must be between 1 and {MAX_GPUS:,}, got {shorten(world_size)}"]
    m, out = config.model, []
    if world_size % m.expert_model_parallel_size:
        out.append(
            f"{world_size} GPUs cannot be split into expert-parallel groups of {m.expert_model_parallel_size} "
            f"(model.expert_model_parallel_size={m.expert_model_parallel_size})"
        )
    step = config.train.micro_batch_size * world_size
    if config.train.global_batch_size % step:
        out.append(
            f"train.global_batch_size={config.train.global_batch_size} is not a multiple of "
            f"micro_batch_size x data-parallel size = {config.train.micro_batch_size} x {world_size}"
        )
    instances = config.ddp.num_distributed_optimizer_instances
    if world_size % instances:
        out.append(
            f"ddp.num_distributed_optimizer_instances={instances} does not divide the data-parallel size {world_size}"
        )
    return out


def validate(config: Config, world_size: int | None = None) -> None:
    """Raise ConfigError listing every problem of the config, if any."""
    found = problems(config, world_size)
    if len(found) == 1:
        raise ConfigError(f"invalid configuration: {found[0]}")
    if found:
        listed = " ".join(f"({i}) {p}" for i, p in enumerate(found, 1))
        raise ConfigError(f"invalid configuration, {len(found)} problems: {listed}")
