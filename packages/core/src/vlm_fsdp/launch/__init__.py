"""Launchers that start `vlm-fsdp train` on many nodes (Slurm)."""
