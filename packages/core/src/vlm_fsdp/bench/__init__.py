"""`vlm-fsdp bench`: our trainer against transformers' Qwen3-VL-MoE on the same batches, one GPU."""
