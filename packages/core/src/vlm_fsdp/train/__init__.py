"""The training run: distributed setup, Megatron-FSDP wrap, step loop, metrics and checkpoints."""
