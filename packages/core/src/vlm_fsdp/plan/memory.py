"""Per-GPU memory estimate of a training layout.

Model state (exact given the parameter counts): bf16 weights (2 bytes), gradients (2 bytes, 4 with
`ddp.grad_reduce_in_fp32`), and for trainable parameters fp32 main weights plus Adam's two moments (12 bytes), or
with `ddp.preserve_fp32_weights=false` only the moments, in the weights' dtype (4 bytes in bf16).
Experts are split by expert parallelism; the
sharding strategy then divides optimizer state (`no_shard`: nothing; `optim_grads`: optimizer state and gradients;
`optim_grads_params`: also the weights) over the data-parallel ranks of each: every GPU for dense parameters, the
ranks holding the same experts for those. Sharded weights need unsharded working
buffers for the FSDP unit being computed and the one prefetched (the largest unit: a decoder layer, the embedding
or the whole vision tower).

Activations (an estimate, bf16): per decoder layer and token the tensors kept for the backward pass
(norm inputs/outputs, Q/K/V and attention output, router scores, each routed copy's expert input (unless the
experts gather it again) and SwiGLU intermediates), reduced by recompute; per vision patch and block the same for
the ViT; and the loss's largest chunk of logits (bf16, their fp32 copy and their bf16 gradient, as if every token
had a label) with the output weight's gradient in its dtype (`vlm_fsdp.model.linear_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass

from vlm_fsdp.config.run import Config, frozen_parts
from vlm_fsdp.model.loss_chunks import chunk_rows
from vlm_fsdp.plan.params import ParamCounts, attention_params, count_params, expert_params, projection_params

GiB = 1024**3


@dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    """Bytes per GPU."""

    weights: int
    gradients: int
    optimizer: int
    fsdp_buffers: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.fsdp_buffers + self.activations


def trainable_params(config: Config, counts: ParamCounts) -> tuple[int, int, int]:
    """Trainable (language dense + embeddings, vision, experts) parameters (`frozen_parts`)."""
    frozen = frozen_parts(config)
    projection = projection_params(config.model)
    language = 0 if frozen.language_model else counts.language_dense + counts.embeddings
    vision = (0 if frozen.vision_model else counts.vision - projection) + (
        0 if frozen.vision_projection else projection
    )
    return language, vision, 0 if frozen.language_model else counts.experts


def estimate_memory(config: Config, world_size: int, image_share: float) -> MemoryEstimate:
    """Memory per GPU on `world_size` GPUs when `image_share` of each sequence's tokens are image tokens."""
    m, ddp = config.model, config.ddp
    counts = count_params(m)
    ep = m.expert_model_parallel_size
    dense_dp, expert_dp = world_size, world_size // ep
    instances = ddp.num_distributed_optimizer_instances

    # parameters held by this rank before data-parallel sharding
    dense = counts.language_dense + counts.embeddings + counts.vision
    experts = counts.experts / ep
    train_language, train_vision, train_experts = trainable_params(config, counts)
    trainable = train_language + train_vision + train_experts / ep

    strategy = ddp.data_parallel_sharding_strategy

    def shard(n_dense: float, n_experts: float, sharded: bool) -> float:
        if not sharded:
            return n_dense + n_experts
        return n_dense / max(dense_dp // instances, 1) + n_experts / max(expert_dp // instances, 1)

    param_bytes = 2 if m.bf16 else 4
    grad_bytes = 4 if ddp.grad_reduce_in_fp32 or not m.bf16 else 2
    shard_fraction = shard(dense, experts, True) / (dense + experts)
    weights = shard(dense, experts, strategy == "optim_grads_params") * param_bytes
    grads_sharded = strategy in ("optim_grads", "optim_grads_params")
    gradients = trainable * (shard_fraction if grads_sharded else 1.0) * grad_bytes
    main_weights = 4 if m.bf16 and ddp.preserve_fp32_weights else 0
    moments = 2 * (4 if ddp.preserve_fp32_weights else param_bytes)
    optimizer = trainable * (shard_fraction if strategy != "no_shard" else 1.0) * (main_weights + moments)

    fsdp_buffers = 0.0
    if strategy == "optim_grads_params":
        layer = attention_params(m) + m.num_moe_experts * m.hidden_size + m.num_moe_experts * expert_params(m) / ep
        unit = max(layer, m.vocab_size * m.hidden_size, counts.vision)  # the vision tower is one unit
        fsdp_buffers = 2 * unit * (param_bytes + grad_bytes)

    return MemoryEstimate(
        weights=round(weights),
        gradients=round(gradients),
        optimizer=round(optimizer),
        fsdp_buffers=round(fsdp_buffers),
        activations=round(activation_bytes(config, image_share)),
    )


def decoder_layer_activation_bytes(config: Config) -> float:
    """Bytes kept for the backward pass per token in one decoder layer, without recompute."""
    m = config.model
    h, q, kv = m.hidden_size, m.num_attention_heads * m.kv_channels, m.num_query_groups * m.kv_channels
    attention = 2 * (2 * h + 2 * q + 2 * kv)
    # the experts' input, top-k copies of each token, unless they gather it again in the backward pass (bf16
    # without expert parallelism: `vlm_fsdp.model.experts`)
    routed = 0 if m.bf16 and m.expert_model_parallel_size == 1 else h
    moe = 2 * (3 * h + m.moe_router_topk * (routed + 3 * m.moe_ffn_hidden_size)) + 8 * m.num_moe_experts
    return attention + moe


def activation_bytes(config: Config, image_share: float) -> float:
    m = config.model
    tokens = config.train.micro_batch_size * m.seq_length
    layers = m.num_layers
    per_layer = decoder_layer_activation_bytes(config)
    if m.recompute_granularity == "full":
        n = m.recompute_num_layers or 1
        if m.recompute_method == "block":
            decoder = n * 2 * m.hidden_size + max(layers - n, 0) * per_layer
        else:
            decoder = (layers / n) * 2 * m.hidden_size + n * per_layer
    elif m.recompute_granularity == "selective":
        q = m.num_attention_heads * m.kv_channels
        decoder = layers * (per_layer - 2 * q)
    else:
        decoder = layers * per_layer
    v = m.vision
    patches = tokens * image_share * v.spatial_merge_size**2
    vision = patches * v.depth * 2 * (7 * v.hidden_size + 3 * v.intermediate_size)
    deepstack = patches / v.spatial_merge_size**2 * m.hidden_size * 2 * len(v.deepstack_visual_indexes)
    # a chunk's logits (bf16 and fp32) and their gradient; the output weight's gradient in its dtype
    logits = min(tokens, chunk_rows(m.vocab_size)) * m.vocab_size * (2 + 4 + 2)
    loss = logits + m.vocab_size * m.hidden_size * (2 if m.bf16 else 4)
    return tokens * decoder + vision + deepstack + loss
