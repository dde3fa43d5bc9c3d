"""Model and parallel-layout configuration.

Names follow Megatron-Core / Megatron-Bridge (`num_query_groups`, `kv_channels`, `moe_ffn_hidden_size`, ...) so
that seed recipes and command lines carry over; `vlm_fsdp.model.hf_config` maps them to Hugging Face names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from vlm_fsdp.config.fields import Length, Range

# Upper bounds of the architecture and layout fields: far above any real model (a 10T-parameter one needs a few
# hundred layers of width 32K), and small enough that every count and estimate stays exact and quick.
MAX_WIDTH = 2**20
MAX_HEADS = 2**16
MAX_LAYERS = 100_000
MAX_VISION_DEPTH = 1024  # `plan` lists every vision block's tensors
MAX_EXPERTS = 2**16
MAX_VOCAB = 2**24
MAX_TOKENS = 2**24
MAX_GPUS = 2**20


@dataclass(kw_only=True)
class VisionConfig:
    """The Qwen3-VL vision tower (a ViT with 2D RoPE, patch merger and DeepStack mergers)."""

    depth: Annotated[int, Range(ge=1, le=MAX_VISION_DEPTH)] = 27
    """Number of transformer blocks in the vision tower."""
    hidden_size: Annotated[int, Range(ge=1, le=MAX_WIDTH)] = 1152
    """Width of the vision transformer."""
    intermediate_size: Annotated[int, Range(ge=1, le=MAX_WIDTH)] = 4304
    """Hidden width of each vision MLP."""
    num_heads: Annotated[int, Range(ge=1, le=MAX_HEADS)] = 16
    """Attention heads per vision block."""
    in_channels: Annotated[int, Range(ge=1, le=64)] = 3
    """Image channels (RGB)."""
    patch_size: Annotated[int, Range(ge=1, le=1024)] = 16
    """Side of a square image patch, in pixels."""
    temporal_patch_size: Annotated[int, Range(ge=1, le=64)] = 2
    """Frames per patch along time; a still image is repeated to fill it."""
    spatial_merge_size: Annotated[int, Range(ge=1, le=64)] = 2
    """Patches merged per side into one language token (2 means 2x2 patches -> 1 token)."""
    num_position_embeddings: Annotated[int, Range(ge=1, le=MAX_TOKENS)] = 2304
    """Size of the learned position-embedding grid (a 48x48 grid, interpolated to each image)."""
    deepstack_visual_indexes: Annotated[
        list[Annotated[int, Range(ge=0, lt=MAX_VISION_DEPTH)]], Length(max=MAX_VISION_DEPTH, what="indexes")
    ] = field(default_factory=lambda: [8, 16, 24])
    """Vision blocks whose outputs are merged and added to the first decoder layers' hidden states (DeepStack)."""
    hidden_act: str = "gelu_pytorch_tanh"
    """Activation of the vision MLPs (a transformers activation name)."""


@dataclass(kw_only=True)
class ModelConfig:
    """A Qwen3-VL mixture-of-experts vision-language model and how it is laid out on GPUs."""

    # --- language decoder architecture ---
    vocab_size: Annotated[int, Range(ge=1, le=MAX_VOCAB)] = 151936
    """Rows of the token embedding and the output layer."""
    hidden_size: Annotated[int, Range(ge=1, le=MAX_WIDTH)] = 2048
    """Width of the language decoder."""
    num_layers: Annotated[int, Range(ge=1, le=MAX_LAYERS)] = 48
    """Decoder layers; every layer has a mixture-of-experts MLP."""
    num_attention_heads: Annotated[int, Range(ge=1, le=MAX_HEADS)] = 32
    """Query heads per attention layer."""
    num_query_groups: Annotated[int, Range(ge=1, le=MAX_HEADS)] = 4
    """Key/value heads (grouped-query attention)."""
    kv_channels: Annotated[int, Range(ge=1, le=MAX_HEADS)] = 128
    """Width of one attention head."""
    ffn_hidden_size: Annotated[int, Range(ge=1, le=MAX_WIDTH)] = 6144
    """Dense-MLP width recorded in the Hugging Face config; Qwen3-VL-MoE layers all use experts instead."""
    num_moe_experts: Annotated[int, Range(ge=1, le=MAX_EXPERTS)] = 128
    """Routed experts per MoE layer."""
    moe_ffn_hidden_size: Annotated[int, Range(ge=1, le=MAX_WIDTH)] = 768
    """Hidden width of one expert's SwiGLU MLP."""
    moe_router_topk: Annotated[int, Range(ge=1, le=MAX_EXPERTS)] = 8
    """Experts each token is routed to (softmax router, top-k probabilities renormalised)."""
    moe_aux_loss_coeff: Annotated[float, Range(ge=0, le=10)] = 0.001
    """Weight of the load-balancing auxiliary loss."""
    norm_epsilon: Annotated[float, Range(gt=0, le=1)] = 1e-6
    """Epsilon of the RMSNorm layers (including QK-norm)."""
    rotary_base: Annotated[float, Range(gt=1, le=1e12)] = 5_000_000.0
    """RoPE base frequency."""
    mrope_section: Annotated[
        list[Annotated[int, Range(ge=0, le=MAX_HEADS)]], Length(min=3, max=3, what="sections (time, height, width)")
    ] = field(default_factory=lambda: [24, 20, 20])
    """Rotary frequency pairs given to the (time, height, width) position ids; sums to kv_channels / 2."""
    max_position_embeddings: Annotated[int, Range(ge=1, le=MAX_TOKENS)] = 262144
    """Longest context the position encoding is configured for."""
    untie_embeddings_and_output_weights: bool = True
    """Keep the output layer separate from the input embedding."""
    image_token_id: Annotated[int, Range(ge=0, lt=MAX_VOCAB)] = 151655
    """Token id of an image placeholder (`<|image_pad|>`); one per merged image token."""
    video_token_id: Annotated[int, Range(ge=0, lt=MAX_VOCAB)] = 151656
    """Token id of a video placeholder (`<|video_pad|>`)."""
    vision_start_token_id: Annotated[int, Range(ge=0, lt=MAX_VOCAB)] = 151652
    """Token id that opens an image span (`<|vision_start|>`)."""
    vision_end_token_id: Annotated[int, Range(ge=0, lt=MAX_VOCAB)] = 151653
    """Token id that closes an image span (`<|vision_end|>`)."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    """The vision tower."""

    hf_path: str | None = None
    """Local Hugging Face Qwen3-VL-MoE directory (config.json + safetensors) whose weights start the run; its
    architecture must match this config."""

    # --- sequence and precision ---
    seq_length: Annotated[int, Range(ge=1, le=MAX_TOKENS)] = 4096
    """Tokens per packed training sequence."""
    bf16: bool = True
    """Train in bfloat16 (fp32 main weights are kept by the optimizer)."""

    # --- parallel layout (names as in Megatron-Bridge) ---
    tensor_model_parallel_size: Annotated[int, Range(ge=1, le=MAX_GPUS)] = 1
    """Tensor-parallel group size; only 1 is implemented (shard with Megatron-FSDP instead)."""
    pipeline_model_parallel_size: Annotated[int, Range(ge=1, le=MAX_GPUS)] = 1
    """Pipeline stages; Megatron-FSDP needs 1."""
    context_parallel_size: Annotated[int, Range(ge=1, le=MAX_GPUS)] = 1
    """Context-parallel group size (splits the sequence); only 1 is implemented."""
    expert_model_parallel_size: Annotated[int, Range(ge=1, le=MAX_GPUS)] = 1
    """Expert-parallel group size: each MoE layer's experts are split over this many consecutive GPUs; must divide
    num_moe_experts and the number of GPUs."""
    expert_tensor_parallel_size: Annotated[int, Range(ge=1, le=MAX_GPUS)] = 1
    """Tensor-parallel size inside each expert; only 1 is implemented."""
    moe_token_dispatcher_type: Literal["alltoall", "allgather"] = "alltoall"
    """How tokens reach their experts across expert-parallel ranks; with expert_model_parallel_size 1 they are
    sorted by expert on the GPU instead, whichever is set."""

    # --- training behaviour ---
    freeze_language_model: bool = False
    """Do not train the language decoder (embeddings, layers, output layer)."""
    freeze_vision_model: bool = False
    """Do not train the vision transformer blocks and patch embedding."""
    freeze_vision_projection: bool = False
    """Do not train the patch merger and DeepStack mergers that project vision features into the decoder."""
    recompute_granularity: Literal["full", "selective"] | None = None
    """Activation recompute: `full` recomputes whole layers, `selective` only attention internals, null none."""
    recompute_method: Literal["uniform", "block"] | None = None
    """With full recompute: `uniform` checkpoints groups of recompute_num_layers, `block` the first N layers."""
    recompute_num_layers: Annotated[int, Range(ge=1, le=MAX_LAYERS)] | None = None
    """With full recompute: layers per group (uniform) or layers recomputed (block)."""
    init_model_with_meta_device: bool | None = None
    """Build the model on the meta device and materialise it shard by shard; null: on with Megatron-FSDP."""
    gradient_accumulation_fusion: bool | None = None
    """Fuse weight-gradient accumulation into the GEMM (needs Transformer Engine); null: off with Megatron-FSDP."""
    calculate_per_token_loss: bool | None = None
    """Normalise the loss by the number of loss tokens across the global batch, not per microbatch; null: on with
    Megatron-FSDP."""
