"""The `vlm-fsdp` command line. Heavy modules (torch, Megatron-Core, transformers) are imported inside the
subcommands that need them, so `--help`, `plan` and `config` stay quick."""
