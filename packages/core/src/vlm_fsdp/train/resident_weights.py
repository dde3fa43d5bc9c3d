"""Megatron-FSDP's weight gathering left out where every weight already lies whole on this rank.

Around every FSDP unit's forward and backward pass Megatron-FSDP all-gathers the unit's weights and releases them
after. Where no weight buffer is distributed (one GPU, or every data-parallel group of one rank), the all-gather
returns a view of the buffer and points every parameter at it again, and the release frees nothing; megatron-core
0.16.1 still walks every parameter of the unit in Python, four times per unit and microbatch, and puts hooks on
every module outside the units. On one H200 that was 9% of an eight-microbatch text step of the benchmark proxy.

`drop_weight_hooks` points the parameters at their buffers once, sets the attributes the all-gather would set,
and removes the gathering and releasing hooks. Kept: the gradient hooks and the root hooks that hand the
gradients over after every backward pass. Weights that any buffer distributes keep every hook.
"""

from __future__ import annotations

from megatron.core.distributed.fsdp.src.megatron_fsdp.mixed_precision import is_float8tensor

# the hook Megatron-FSDP's backward_pre_hooks table keeps for the root module, which stays
_ROOT_HOOK = "_root_pre_backward"


def weights_resident(fsdp) -> bool:
    """Whether every weight buffer of `fsdp` (a `MegatronFSDP`) holds its whole weights on this rank."""
    for group in fsdp.param_and_grad_buffer.parameter_groups:
        for buffer in (group.model_weight_buffer, group.transpose_weight_buffer, group.hsdp_wbuf):
            if buffer is not None and buffer.is_data_distributed:
                return False
        if any(map(is_float8tensor, group.params)):
            return False
    return True


def drop_weight_hooks(fsdp) -> bool:
    """Remove `fsdp`'s weight gathering and releasing hooks where its weights are resident; returns whether it did."""
    if not weights_resident(fsdp):
        return False
    # the module's own parameters, not the sharded ones the module holds until its first forward pass
    fsdp.all_gather_and_wait_parameters_ready(list(fsdp.raw_param.values()), prefetch=False)
    for table in (fsdp.forward_pre_hooks, fsdp.forward_hooks, fsdp.backward_pre_hooks):
        for name in [name for name in table if not name.endswith(_ROOT_HOOK)]:
            table.pop(name).remove()
    return True
