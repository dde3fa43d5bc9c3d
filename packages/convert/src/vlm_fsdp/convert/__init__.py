"""Checkpoint conversion and inspection: Hugging Face safetensors <-> fsdp_dtensor, and `vlm-fsdp inspect`."""
