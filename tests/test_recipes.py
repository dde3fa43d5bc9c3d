"""Recipes: each builds a valid config, full-size ones match the public Hugging Face architectures, and the
analytic parameter counts equal those of transformers' model built on the meta device."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration
from vlm_fsdp.config import load_config
from vlm_fsdp.config.recipes import recipe_names
from vlm_fsdp.model.hf_config import hf_config_dict
from vlm_fsdp.plan.params import count_params

# Fields of the public config.json of each Instruct model that define its architecture.
PUBLIC = {
    "qwen3_vl_30b_a3b": {
        "text": dict(
            hidden_size=2048,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_experts=128,
            num_experts_per_tok=8,
            vocab_size=151936,
            rms_norm_eps=1e-6,
            max_position_embeddings=262144,
        ),
        "rope_theta": 5_000_000,
        "mrope_section": [24, 20, 20],
        "out_hidden_size": 2048,
    },
    "qwen3_vl_235b_a22b": {
        "text": dict(
            hidden_size=4096,
            num_hidden_layers=94,
            num_attention_heads=64,
            num_key_value_heads=4,
            head_dim=128,
            intermediate_size=12288,
            moe_intermediate_size=1536,
            num_experts=128,
            num_experts_per_tok=8,
            vocab_size=151936,
            rms_norm_eps=1e-6,
            max_position_embeddings=262144,
        ),
        "rope_theta": 5_000_000,
        "mrope_section": [24, 20, 20],
        "out_hidden_size": 4096,
    },
}
PUBLIC_VISION = dict(
    depth=27,
    hidden_size=1152,
    intermediate_size=4304,
    num_heads=16,
    patch_size=16,
    temporal_patch_size=2,
    spatial_merge_size=2,
    num_position_embeddings=2304,
    deepstack_visual_indexes=[8, 16, 24],
    hidden_act="gelu_pytorch_tanh",
    in_channels=3,
)


def test_recipes_are_installed():
    assert {
        "tiny",
        "tiny_text",
        "qwen3_vl_30b_a3b",
        "qwen3_vl_235b_a22b",
        "qwen3_vl_30b_a3b_proxy",
        "qwen3_vl_30b_a3b_proxy_text",
    } <= set(recipe_names())


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_full_size_recipes_match_the_public_configs(name):
    hf = Qwen3VLMoeConfig(**hf_config_dict(load_config(name).model))
    for key, value in PUBLIC[name]["text"].items():
        assert getattr(hf.text_config, key) == value, key
    assert hf.text_config.rope_parameters["rope_theta"] == PUBLIC[name]["rope_theta"]
    assert hf.text_config.rope_parameters["mrope_section"] == PUBLIC[name]["mrope_section"]
    assert hf.text_config.rope_parameters["mrope_interleaved"] is True
    assert hf.text_config.mlp_only_layers == [] and hf.text_config.decoder_sparse_step == 1
    for key, value in PUBLIC_VISION.items():
        assert getattr(hf.vision_config, key) == value, key
    assert hf.vision_config.out_hidden_size == PUBLIC[name]["out_hidden_size"]
    assert hf.tie_word_embeddings is False
    assert (hf.image_token_id, hf.vision_start_token_id, hf.vision_end_token_id) == (151655, 151652, 151653)


def test_proxy_keeps_30b_shapes_with_six_layers_and_32_experts():
    full, proxy = load_config("qwen3_vl_30b_a3b").model, load_config("qwen3_vl_30b_a3b_proxy").model
    assert (proxy.num_layers, proxy.num_moe_experts, proxy.moe_router_topk) == (6, 32, 8)
    for key in (
        "hidden_size",
        "num_attention_heads",
        "num_query_groups",
        "kv_channels",
        "moe_ffn_hidden_size",
        "vocab_size",
        "vision",
    ):
        assert getattr(proxy, key) == getattr(full, key), key


@pytest.mark.parametrize("name", sorted(recipe_names()))
def test_parameter_counts_equal_transformers_on_meta_device(name):
    model_config = load_config(name).model
    with torch.device("meta"):
        model = Qwen3VLMoeForConditionalGeneration(Qwen3VLMoeConfig(**hf_config_dict(model_config)))
    vision = sum(p.numel() for p in model.model.visual.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    embeddings = model.model.language_model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    counts = count_params(model_config)
    assert counts.total == total
    assert counts.vision == vision
    assert counts.experts == experts
    assert counts.embeddings == embeddings
    assert counts.language_dense == total - vision - experts - embeddings


@pytest.mark.parametrize(
    ("name", "yaml_file"),
    [
        ("qwen3_vl_30b_a3b", "qwen3_vl_30b_a3b_mfsdp.yaml"),
        ("qwen3_vl_235b_a22b", "qwen3_vl_235b_a22b_mfsdp.yaml"),
    ],
)
def test_megatron_fsdp_yaml_files_apply_to_their_recipes(root, name, yaml_file):
    config = load_config(name, config_file=root / "recipes" / yaml_file)
    assert config.dist.use_megatron_fsdp
    assert config.checkpoint.ckpt_format == "fsdp_dtensor"
    assert config.ddp.data_parallel_sharding_strategy == "optim_grads_params"
    assert config.model.recompute_granularity == "full"
    assert config.model.moe_token_dispatcher_type == "alltoall"
    assert config.model.expert_model_parallel_size > 1


def test_every_yaml_in_recipes_folder_is_tested(root):
    assert sorted(p.name for p in (root / "recipes").glob("*.yaml")) == [
        "qwen3_vl_235b_a22b_mfsdp.yaml",
        "qwen3_vl_30b_a3b_mfsdp.yaml",
    ]
