"""Test support: Megatron-FSDP and expert parallelism on CPU processes over gloo. Never imported by the product."""
