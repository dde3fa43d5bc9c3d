"""Qwen3-VL mixture-of-experts recipes.

The two full-size recipes carry exactly the architecture of the public Hugging Face configs of
Qwen3-VL-30B-A3B-Instruct and Qwen3-VL-235B-A22B-Instruct. The proxy keeps 30B-A3B's shapes with 6 decoder
layers and 32 experts (the benchmark model), and `tiny` is a one-GPU smoke run on the bundled data.
Everything not set here comes from the `Config` defaults: Megatron-FSDP with ZeRO-3 sharding. The Qwen3-VL
recipes compile the units' computation (`train.compile`); `tiny` stays eager, where compiling would take longer
than its run.
"""

from __future__ import annotations

from dataclasses import replace

from vlm_fsdp.config import Config, DataConfig, ModelConfig, OptimizerConfig, TrainConfig, VisionConfig

# Ids of the Qwen3-VL special tokens in the bundled byte-level BPE tokenizer (used by `tiny` and the proxy):
# they follow the regular tokens, in Qwen's order, so `<|endoftext|>` is 8000 and `<|image_pad|>` 8012.
BUNDLED_TOKENIZER_IDS = dict(
    image_token_id=8012, video_token_id=8013, vision_start_token_id=8009, vision_end_token_id=8010
)


def qwen3_vl_30b_a3b() -> Config:
    """Qwen3-VL-30B-A3B-Instruct: 48 layers, 128 experts (top-8), 2048 wide; 27-block vision tower."""
    return Config(
        model=ModelConfig(
            vocab_size=151936,
            hidden_size=2048,
            num_layers=48,
            num_attention_heads=32,
            num_query_groups=4,
            kv_channels=128,
            ffn_hidden_size=6144,
            num_moe_experts=128,
            moe_ffn_hidden_size=768,
            moe_router_topk=8,
            rotary_base=5_000_000.0,
            mrope_section=[24, 20, 20],
            max_position_embeddings=262144,
            vision=VisionConfig(),
        ),
        train=TrainConfig(train_iters=1000, global_batch_size=32, micro_batch_size=1, compile=True),
        optimizer=OptimizerConfig(lr=1e-5, min_lr=1e-6, lr_warmup_iters=50),
    )


def qwen3_vl_235b_a22b() -> Config:
    """Qwen3-VL-235B-A22B-Instruct: 94 layers, 128 experts (top-8), 4096 wide; 27-block vision tower."""
    base = qwen3_vl_30b_a3b()
    base.model = replace(
        base.model,
        hidden_size=4096,
        num_layers=94,
        num_attention_heads=64,
        num_query_groups=4,
        ffn_hidden_size=12288,
        moe_ffn_hidden_size=1536,
    )
    return base


def qwen3_vl_30b_a3b_proxy() -> Config:
    """Benchmark proxy of 30B-A3B: its shapes with 6 decoder layers and 32 experts (top-8), full vision tower."""
    base = qwen3_vl_30b_a3b()
    base.model = replace(base.model, num_layers=6, num_moe_experts=32, **BUNDLED_TOKENIZER_IDS)
    base.train = TrainConfig(train_iters=50, global_batch_size=1, micro_batch_size=1, compile=True)
    base.optimizer = OptimizerConfig(lr_warmup_iters=5)
    return base


def qwen3_vl_30b_a3b_proxy_text() -> Config:
    """The 30B-A3B proxy trained on the bundled text-only data (the vision tower is built but gets no images)."""
    base = qwen3_vl_30b_a3b_proxy()
    base.data = DataConfig(text_only=True)
    return base


def tiny() -> Config:
    """A tiny Qwen3-VL-MoE (4 layers, 8 experts, 4-block vision tower): a one-GPU smoke run of 100 steps of one
    microbatch of 8 sequences each (about 12 s of steps on an H100, under a minute with start-up); on several GPUs
    lower train.micro_batch_size to global_batch_size / GPUs or below."""
    return Config(
        model=ModelConfig(
            vocab_size=8192,
            hidden_size=256,
            num_layers=4,
            num_attention_heads=4,
            num_query_groups=2,
            kv_channels=64,
            ffn_hidden_size=512,
            num_moe_experts=8,
            moe_ffn_hidden_size=128,
            moe_router_topk=2,
            rotary_base=1_000_000.0,
            mrope_section=[12, 10, 10],
            max_position_embeddings=8192,
            seq_length=1024,
            vision=VisionConfig(
                depth=4,
                hidden_size=128,
                intermediate_size=256,
                num_heads=4,
                num_position_embeddings=1024,
                deepstack_visual_indexes=[1, 2],
            ),
            **BUNDLED_TOKENIZER_IDS,
        ),
        train=TrainConfig(train_iters=100, global_batch_size=8, micro_batch_size=8),
        optimizer=OptimizerConfig(lr=1e-3, min_lr=1e-4, lr_warmup_iters=20),
    )


def tiny_text() -> Config:
    """The tiny model on the bundled text-only data."""
    base = tiny()
    base.data = DataConfig(text_only=True)
    return base
