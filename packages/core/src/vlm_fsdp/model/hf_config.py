"""Our `ModelConfig` as a Hugging Face `Qwen3VLMoeConfig` dictionary (the `config.json` of an exported model)."""

from __future__ import annotations

from typing import Any

from vlm_fsdp.config.model import ModelConfig


def hf_config_dict(model: ModelConfig) -> dict[str, Any]:
    """The `config.json` contents transformers' `Qwen3VLMoeConfig` reads for this architecture."""
    v = model.vision
    return {
        "architectures": ["Qwen3VLMoeForConditionalGeneration"],
        "model_type": "qwen3_vl_moe",
        "image_token_id": model.image_token_id,
        "video_token_id": model.video_token_id,
        "vision_start_token_id": model.vision_start_token_id,
        "vision_end_token_id": model.vision_end_token_id,
        "tie_word_embeddings": not model.untie_embeddings_and_output_weights,
        "text_config": {
            "model_type": "qwen3_vl_moe_text",
            "vocab_size": model.vocab_size,
            "hidden_size": model.hidden_size,
            "intermediate_size": model.ffn_hidden_size,
            "num_hidden_layers": model.num_layers,
            "num_attention_heads": model.num_attention_heads,
            "num_key_value_heads": model.num_query_groups,
            "head_dim": model.kv_channels,
            "hidden_act": "silu",
            "max_position_embeddings": model.max_position_embeddings,
            "rms_norm_eps": model.norm_epsilon,
            "attention_bias": False,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "moe_intermediate_size": model.moe_ffn_hidden_size,
            "num_experts": model.num_moe_experts,
            "num_experts_per_tok": model.moe_router_topk,
            "norm_topk_prob": True,
            "router_aux_loss_coef": model.moe_aux_loss_coeff,
            "tie_word_embeddings": not model.untie_embeddings_and_output_weights,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": model.rotary_base,
                "mrope_section": list(model.mrope_section),
                "mrope_interleaved": True,
            },
        },
        "vision_config": {
            "model_type": "qwen3_vl_moe_vision",
            "depth": v.depth,
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads,
            "in_channels": v.in_channels,
            "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "out_hidden_size": model.hidden_size,
            "num_position_embeddings": v.num_position_embeddings,
            "deepstack_visual_indexes": list(v.deepstack_visual_indexes),
            "hidden_act": v.hidden_act,
        },
    }


VISION_KEYS = (
    "depth",
    "hidden_size",
    "intermediate_size",
    "num_heads",
    "in_channels",
    "patch_size",
    "temporal_patch_size",
    "spatial_merge_size",
    "num_position_embeddings",
    "deepstack_visual_indexes",
    "hidden_act",
)


def model_fields_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """The architecture fields of `ModelConfig` (as a `model:` mapping) that a Hugging Face config.json fixes."""
    text, vision = hf["text_config"], hf["vision_config"]
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    return {
        "vocab_size": text["vocab_size"],
        "hidden_size": text["hidden_size"],
        "ffn_hidden_size": text["intermediate_size"],
        "num_layers": text["num_hidden_layers"],
        "num_attention_heads": text["num_attention_heads"],
        "num_query_groups": text["num_key_value_heads"],
        "kv_channels": text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"],
        "max_position_embeddings": text["max_position_embeddings"],
        "norm_epsilon": text["rms_norm_eps"],
        "moe_ffn_hidden_size": text["moe_intermediate_size"],
        "num_moe_experts": text["num_experts"] if "num_experts" in text else text["num_local_experts"],
        "moe_router_topk": text["num_experts_per_tok"],
        "rotary_base": float(rope.get("rope_theta", text.get("rope_theta", 5_000_000.0))),
        "mrope_section": list(rope.get("mrope_section", [24, 20, 20])),
        "untie_embeddings_and_output_weights": not hf.get("tie_word_embeddings", False),
        "image_token_id": hf["image_token_id"],
        "video_token_id": hf["video_token_id"],
        "vision_start_token_id": hf["vision_start_token_id"],
        "vision_end_token_id": hf["vision_end_token_id"],
        "vision": {key: vision[key] for key in VISION_KEYS},
    }


def architecture_mismatches(model: ModelConfig, hf: dict[str, Any]) -> list[str]:
    """`model.key: ours != theirs` for every architecture field where `model` differs from a config.json."""
    ours = hf_config_dict(model)
    found = []
    for key, theirs in model_fields_from_hf(hf).items():
        mine = model_fields_from_hf(ours)[key]
        if key == "vision":
            found += [f"model.vision.{k}: {mine[k]!r} != {v!r}" for k, v in theirs.items() if mine[k] != v]
        elif mine != theirs:
            found.append(f"model.{key}: {mine!r} != {theirs!r}")
    return found
