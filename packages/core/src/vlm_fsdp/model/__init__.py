"""The Qwen3-VL-MoE model: Megatron-Core language decoder, Hugging Face vision tower, weight mapping."""
