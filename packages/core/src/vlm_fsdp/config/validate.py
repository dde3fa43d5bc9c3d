"""Checks that a resolved config describes a model and layout that can run, with the reason when not."""

from __future__ import annotations

from vlm_fsdp.config.run import Config
from vlm_fsdp.errors import ConfigError


def problems(config: Config, world_size: int | None = None) -> list[str]:
    """Every reason the config cannot run (on `world_size` GPUs, when given); empty when it can."""
    m, v, ddp, out = config.model, config.model.vision, config.ddp, []
    fsdp = config.dist.use_megatron_fsdp

    # Megatron-FSDP compatibility
    if fsdp and config.dist.use_torch_fsdp2:
        out.append("dist.use_megatron_fsdp and dist.use_torch_fsdp2 are both true: choose one FSDP implementation")
    if config.dist.use_torch_fsdp2:
        out.append("dist.use_torch_fsdp2=true is not supported; use dist.use_megatron_fsdp=true")
    if fsdp and config.checkpoint.ckpt_format == "torch_dist":
        out.append(
            "checkpoint.ckpt_format=torch_dist cannot save Megatron-FSDP's sharded parameters; use "
            "fsdp_dtensor (convert existing torch_dist checkpoints with `vlm-fsdp convert torch-dist-to-fsdp`)"
        )
    if not fsdp and config.checkpoint.ckpt_format == "fsdp_dtensor":
        out.append("checkpoint.ckpt_format=fsdp_dtensor needs dist.use_megatron_fsdp=true")
    if fsdp and m.pipeline_model_parallel_size > 1:
        out.append(
            "Megatron-FSDP does not support pipeline parallelism: set model.pipeline_model_parallel_size=1 "
            "(shard with FSDP and expert parallelism instead)"
        )
    if fsdp and m.gradient_accumulation_fusion:
        out.append(
            "model.gradient_accumulation_fusion=true does not work with Megatron-FSDP's gradient buffers; "
            "set it to false"
        )
    if ddp.data_parallel_sharding_strategy != "no_shard" and not ddp.use_distributed_optimizer:
        out.append(
            f"ddp.data_parallel_sharding_strategy={ddp.data_parallel_sharding_strategy} shards optimizer "
            "state, which needs ddp.use_distributed_optimizer=true"
        )
    if fsdp and m.init_model_with_meta_device and ddp.data_parallel_sharding_strategy == "no_shard":
        out.append(
            "model.init_model_with_meta_device=true needs a sharding strategy other than no_shard "
            "(Megatron-FSDP materialises meta parameters shard by shard); set it to false"
        )
    if ddp.outer_dp_sharding_strategy != "no_shard" and ddp.num_distributed_optimizer_instances < 2:
        out.append("ddp.outer_dp_sharding_strategy needs ddp.num_distributed_optimizer_instances >= 2")
    if ddp.nccl_ub and not ddp.fsdp_double_buffer:
        out.append("ddp.nccl_ub=true needs ddp.fsdp_double_buffer=true (registered buffers must be persistent)")

    # architecture
    if m.num_moe_experts % m.expert_model_parallel_size:
        out.append(
            f"model.expert_model_parallel_size={m.expert_model_parallel_size} does not divide "
            f"model.num_moe_experts={m.num_moe_experts}"
        )
    if not 0 < m.moe_router_topk <= m.num_moe_experts:
        out.append(f"model.moe_router_topk={m.moe_router_topk} must be between 1 and model.num_moe_experts")
    if m.num_attention_heads % m.num_query_groups:
        out.append(
            f"model.num_query_groups={m.num_query_groups} does not divide "
            f"model.num_attention_heads={m.num_attention_heads}"
        )
    tp = m.tensor_model_parallel_size
    if m.num_query_groups % tp:
        out.append(f"model.tensor_model_parallel_size={tp} does not divide model.num_query_groups={m.num_query_groups}")
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

    # training behaviour
    if m.freeze_language_model and m.freeze_vision_model and m.freeze_vision_projection:
        out.append("every part of the model is frozen: nothing would be trained")
    if m.recompute_granularity == "full":
        if m.recompute_method is None or m.recompute_num_layers is None:
            out.append("model.recompute_granularity=full needs model.recompute_method and model.recompute_num_layers")
        elif not 1 <= m.recompute_num_layers <= m.num_layers:
            out.append(f"model.recompute_num_layers={m.recompute_num_layers} must be between 1 and model.num_layers")
    elif m.recompute_method is not None or m.recompute_num_layers is not None:
        out.append(
            "model.recompute_method and model.recompute_num_layers apply only with model.recompute_granularity=full"
        )
    t = config.train
    for name in ("train_iters", "global_batch_size", "micro_batch_size", "eval_iters"):
        if getattr(t, name) < 1:
            out.append(f"train.{name} must be at least 1")
    if t.global_batch_size % t.micro_batch_size:
        out.append(
            f"train.micro_batch_size={t.micro_batch_size} does not divide train.global_batch_size={t.global_batch_size}"
        )
    if config.optimizer.min_lr > config.optimizer.lr:
        out.append("optimizer.min_lr is larger than optimizer.lr")
    decay = config.optimizer.lr_decay_iters or t.train_iters
    if config.optimizer.lr_warmup_iters >= decay:
        out.append(
            f"optimizer.lr_warmup_iters={config.optimizer.lr_warmup_iters} must be below the decay length {decay} "
            "(optimizer.lr_decay_iters, or train.train_iters when that is null)"
        )

    if world_size is not None:
        out += layout_problems(config, world_size)
    return out


def layout_problems(config: Config, world_size: int) -> list[str]:
    """Reasons the parallel layout does not fit `world_size` GPUs."""
    m, out = config.model, []
    model_parallel = m.tensor_model_parallel_size * m.pipeline_model_parallel_size * m.context_parallel_size
    if world_size % model_parallel:
        out.append(
            f"{world_size} GPUs cannot be split into tensor x pipeline x context parallel groups of {model_parallel}"
        )
        return out
    expert_parallel = m.expert_model_parallel_size * m.expert_tensor_parallel_size * m.pipeline_model_parallel_size
    if world_size % expert_parallel:
        out.append(
            f"{world_size} GPUs cannot be split into expert x expert-tensor x pipeline groups of "
            f"{expert_parallel} (model.expert_model_parallel_size={m.expert_model_parallel_size})"
        )
    dp = world_size // model_parallel
    step = config.train.micro_batch_size * dp
    if config.train.global_batch_size % step:
        out.append(
            f"train.global_batch_size={config.train.global_batch_size} is not a multiple of "
            f"micro_batch_size x data-parallel size = {config.train.micro_batch_size} x {dp}"
        )
    instances = config.ddp.num_distributed_optimizer_instances
    if dp % instances:
        out.append(f"ddp.num_distributed_optimizer_instances={instances} does not divide the data-parallel size {dp}")
    return out


def validate(config: Config, world_size: int | None = None) -> None:
    """Raise ConfigError listing every problem of the config, if any."""
    found = problems(config, world_size)
    if found:
        raise ConfigError("invalid configuration:\n" + "\n".join(f"  - {p}" for p in found))


def data_parallel_size(config: Config, world_size: int) -> int:
    m = config.model
    return world_size // (m.tensor_model_parallel_size * m.pipeline_model_parallel_size * m.context_parallel_size)
