"""Checks that a resolved config describes a model and layout that can run, with the reason when not."""

from __future__ import annotations

from vlm_fsdp.config.run import Config
from vlm_fsdp.errors import ConfigError

# parallel splits the model code does not implement, and why
UNSPLIT = {
    "tensor_model_parallel_size": "the vision tower (transformers') and the grouped experts are not tensor-parallel",
    "context_parallel_size": "the packed-sequence attention does not split sequences across ranks",
    "expert_tensor_parallel_size": "the grouped experts are not tensor-parallel",
}


def problems(config: Config, world_size: int | None = None) -> list[str]:
    """Every reason the config cannot run (on `world_size` GPUs, when given); empty when it can."""
    m, v, ddp, out = config.model, config.model.vision, config.ddp, []

    # what this trainer implements: Megatron-FSDP with expert parallelism, nothing else
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
    """Reasons the parallel layout does not fit `world_size` GPUs (every GPU is a data-parallel rank)."""
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
    if found:
        raise ConfigError("invalid configuration:\n" + "\n".join(f"  - {p}" for p in found))
