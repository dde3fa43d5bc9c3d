"""CPU planning: parameter counts, FLOPs per token and per-GPU memory of a config, before any GPU is used."""
