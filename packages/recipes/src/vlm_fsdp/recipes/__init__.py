"""Training recipes: small functions that start from a base config and change only what differs.

Each recipe is registered under the `vlm_fsdp.recipes` entry-point group in this package's pyproject.toml.
"""
