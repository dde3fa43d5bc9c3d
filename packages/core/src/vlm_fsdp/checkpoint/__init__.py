"""fsdp_dtensor checkpoints: torch.distributed.checkpoint (DCP) directories of model, optimizer and run state."""
