"""Our `ModelConfig` as Megatron-Core's `TransformerConfig` for the language decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig
from vlm_fsdp.config.model import ModelConfig


def transformer_config(model: ModelConfig, *, on_meta_device: bool) -> TransformerConfig:
    """Qwen3-MoE decoder settings: RMSNorm, QK-norm, GQA, no biases, SwiGLU experts, softmax top-k router with
    renormalised top-k probabilities (top-k on logits, then softmax) and a load-balancing auxiliary loss."""
    dtype = torch.bfloat16 if model.bf16 else torch.float32
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        qk_layernorm=True,
        add_bias_linear=False,
        add_qkv_bias=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        num_moe_experts=model.num_moe_experts,
        moe_ffn_hidden_size=model.moe_ffn_hidden_size,
        moe_router_topk=model.moe_router_topk,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=False,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=model.moe_aux_loss_coeff,
        moe_router_dtype="fp32",
        moe_token_dispatcher_type=model.moe_token_dispatcher_type,
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        tensor_model_parallel_size=model.tensor_model_parallel_size,
        pipeline_model_parallel_size=model.pipeline_model_parallel_size,
        context_parallel_size=model.context_parallel_size,
        expert_model_parallel_size=model.expert_model_parallel_size,
        expert_tensor_parallel_size=model.expert_tensor_parallel_size,
        sequence_parallel=False,
        bf16=model.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        # fused kernels that need Transformer Engine or Apex are off on this TE-free path
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=bool(model.gradient_accumulation_fusion),
        calculate_per_token_loss=bool(model.calculate_per_token_loss),
        init_model_with_meta_device=bool(model.init_model_with_meta_device),
        use_cpu_initialization=on_meta_device or not torch.cuda.is_available(),
        perform_initialization=not on_meta_device,
        recompute_granularity=model.recompute_granularity,
        recompute_method=model.recompute_method,
        recompute_num_layers=model.recompute_num_layers,
    )
