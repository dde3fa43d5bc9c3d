"""Megatron-FSDP's per-unit and per-parameter Python trimmed where every weight and gradient lies whole on this rank.

Around every FSDP unit's forward and backward pass Megatron-FSDP all-gathers the unit's weights and releases them
after. Where no weight buffer is distributed (one GPU, or every data-parallel group of one rank), the all-gather
returns a view of the buffer and points every parameter at it again, and the release frees nothing; megatron-core
0.16.1 still walks every parameter of the unit in Python, four times per unit and microbatch, and puts hooks on
every module outside the units. On one H200 that was 9% of an eight-microbatch text step of the benchmark proxy.
After every parameter's gradient is computed, its hook looks the parameter's group and buffer up, builds a view
of its slice of the gradient buffer, and adds the gradient there: where the gradient buffers are not distributed
either, that slice never moves.

`use_resident_buffers` points the parameters at their buffers once, sets the attributes the all-gather would set,
and removes the gathering and releasing hooks from every module that has them (Megatron-FSDP's own tables of hooks
are keyed by module class, so they hold the last decoder layer's and lose the others'); where the gradient buffers
are resident too, every parameter's gradient hook becomes one that adds into the slice found once
(`_accumulate_into`) and otherwise does what Megatron-FSDP's does. Kept: the root hooks that hand the gradients over
after every backward pass. Weights that any buffer distributes keep every hook.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from megatron.core.distributed.fsdp.src.megatron_fsdp.mixed_precision import is_float8tensor
from megatron.core.distributed.fsdp.src.megatron_fsdp.param_and_grad_buffer import to_local_if_dtensor

# the hook Megatron-FSDP's backward_pre_hooks table keeps for the root module, which stays
_ROOT_HOOK = "_root_pre_backward"
# Megatron-FSDP's name for a parameter's gradient hook in its grad_acc_hooks table
_GRADIENT_HOOK = "grad_acc and reduce for {}"


def weights_resident(fsdp) -> bool:
    """Whether every weight buffer of `fsdp` (a `MegatronFSDP`) holds its whole weights on this rank."""
    for group in fsdp.param_and_grad_buffer.parameter_groups:
        for buffer in (group.model_weight_buffer, group.transpose_weight_buffer, group.hsdp_wbuf):
            if buffer is not None and buffer.is_data_distributed:
                return False
        if any(map(is_float8tensor, group.params)):
            return False
    return True


def gradients_resident(fsdp) -> bool:
    """Whether every gradient buffer of `fsdp` holds its whole gradients on this rank, under a sharded strategy
    (whose hooks hand every gradient to the reduction at once)."""
    if fsdp.ddp_config.data_parallel_sharding_strategy == "no_shard" or fsdp.dist_index.use_hybrid_fsdp:
        return False
    buffers = [group.main_grad_buffer for group in fsdp.param_and_grad_buffer.parameter_groups]
    return not any(buffer is not None and buffer.is_data_distributed for buffer in buffers)


def use_resident_buffers(fsdp) -> None:
    """Remove `fsdp`'s weight gathering and releasing hooks where its weights are resident, and give every
    parameter a gradient hook with its gradient slice found once where its gradients are resident too."""
    if not weights_resident(fsdp):
        return
    # the module's own parameters, not the sharded ones the module holds until its first forward pass
    fsdp.all_gather_and_wait_parameters_ready(list(fsdp.raw_param.values()), prefetch=False)
    gathering = set()
    for table in (fsdp.forward_pre_hooks, fsdp.forward_hooks, fsdp.backward_pre_hooks):
        for name in [name for name in table if not name.endswith(_ROOT_HOOK)]:
            handle = table.pop(name)
            gathering.add(hook_handler(handle.hooks_dict_ref()[handle.id]))
            handle.remove()
    for module in fsdp.module.modules():
        _remove_module_hooks(module, gathering)
    if not gradients_resident(fsdp):
        return
    for param, name in fsdp.param_to_name.items():
        key = _GRADIENT_HOOK.format(name)
        if key not in fsdp.grad_acc_hooks or not param.requires_grad or getattr(param, "_is_shared", False):
            continue
        fsdp.grad_acc_hooks.pop(key).remove()
        fsdp.grad_acc_hooks[key] = param.register_post_accumulate_grad_hook(
            _accumulate_into(param.get_main_grad(), fsdp)
        )


def hook_handler(hook: Callable) -> Callable:
    """The function a Megatron-FSDP module hook runs: the hook itself (without torch.compiler.disable's wrapper), or
    for a backward hook, which Megatron-FSDP attaches through a forward hook of its own per module, the handler that
    forward hook's closure holds."""
    hook = inspect.unwrap(hook)
    code = getattr(hook, "__code__", None)
    if code is None:
        return hook
    cells = dict(zip(code.co_freevars, hook.__closure__ or (), strict=True))
    return cells["custom_backward_handler"].cell_contents if "custom_backward_handler" in cells else hook


def _remove_module_hooks(module: torch.nn.Module, handlers: set[Callable]) -> None:
    """Remove `module`'s forward pre-hooks and forward hooks that run one of `handlers`."""
    for hooks, companions in (
        (module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
        (module._forward_hooks, (module._forward_hooks_with_kwargs, module._forward_hooks_always_called)),
    ):
        for key in [key for key, hook in hooks.items() if hook_handler(hook) in handlers]:
            del hooks[key]
            for companion in companions:
                companion.pop(key, None)


def _accumulate_into(main_grad: torch.Tensor, fsdp) -> Callable[[torch.Tensor], None]:
    """megatron-core 0.16.1's gradient hook for a parameter of a buffer that is not distributed, with the
    parameter's slice of the buffer (`main_grad`) given: the gradient is added there and dropped, then handed to
    the reduction pipeline, which tracks the gradients that are ready."""
    pipeline, capacity = fsdp.grad_reduce_pipeline, fsdp.suggested_RS_queue_capacity

    def accumulate(param: torch.Tensor) -> None:
        if not param.grad_added_to_main_grad and param.grad is not None:
            param.main_grad = main_grad
            main_grad.add_(to_local_if_dtensor(param.grad))
        param.grad = None
        param.grad_added_to_main_grad = False
        pipeline.reduce_gradients([param], suggested_queue_capacity=capacity)
        fsdp._params_require_handle_grad.discard(param)

    return accumulate
