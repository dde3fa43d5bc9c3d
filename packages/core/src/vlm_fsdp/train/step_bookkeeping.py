"""Megatron-FSDP's per-step bookkeeping done buffer by buffer instead of parameter by parameter.

megatron-core 0.16.1's Megatron-FSDP hands the reduced gradients to the optimizer's parameters and copies the
updated main weights into the model's weights in Python loops over the parameters, with one conversion or copy
kernel each (the benchmark proxy has about 400 parameters), and it hands the gradients over twice per step: when
the reduction finishes and again after `finalize_model_grads` has divided them by the number of loss tokens, a
number it first reads on the host. On one H200 that bookkeeping took about a fifth of a one-microbatch step
with images. Here (`install`):

- the gradients are converted to the main weights' dtype with one kernel per buffer, and the optimizer's
  parameters get views of the result, once per step, after the division (`GradientViews`, `finalize`);
- the division by the global number of loss tokens reads that number on the GPU (`finalize`);
- where a main-weight buffer and its model-weight buffer share their layout (the sharded strategies), the updated
  main weights are copied with one kernel per buffer (`copy_main_weights`);
- a gradient buffer whose data-parallel group is this rank alone is not reduced after every microbatch
  (`UndistributedBuffers`).

Every replacement produces the tensors Megatron-FSDP's own methods do, bitwise (`tests/test_multirank.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from megatron.core import parallel_state
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.distributed.fsdp.src.megatron_fsdp.mixed_precision import is_float8tensor
from megatron.core.distributed.fsdp.src.megatron_fsdp.param_and_grad_buffer import make_fsdp_dtensor


class GradientViews:
    """`update_main_grads` of a Megatron-FSDP buffer, by buffer: each gradient buffer's shard is converted to the
    main weights' dtype once, and every optimizer parameter's `.grad` is a DTensor over its slice of that."""

    def __init__(self, buffer) -> None:
        self.buffer = buffer
        self.sharded = buffer.bucketing_policy.data_parallel_sharding_strategy != "no_shard"
        groups: dict[int, tuple] = {}
        for name, param in buffer.optimizer_named_parameters:
            original = param.orig_param
            index = buffer.param_to_param_group[original]
            group = buffer.parameter_groups[index]
            gbuf = group.main_grad_buffer
            if gbuf is None:
                continue
            item = gbuf.param_idx[original]
            if self.sharded:
                start, end = gbuf._get_item_local_shard_index(item)
                offset = gbuf.shard_bucket_index.local_data_index
                start, end = (start - offset, end - offset) if end > start else (0, 0)
            else:
                start, end = gbuf._get_item_local_index(item)
            groups.setdefault(index, (group, param.dtype, []))[2].append((name, param, original, start, end))
        self.groups = list(groups.values())

    @staticmethod
    def applies_to(buffer) -> bool:
        """Whether every gradient comes out in its optimizer parameter's dtype, which Megatron-FSDP converts to
        (a precision-aware optimizer keeps them apart, and Megatron-FSDP's own method stays in use)."""
        if getattr(buffer, "use_precision_aware_optimizer", False):
            return False
        for _, param in buffer.optimizer_named_parameters:
            group = buffer.parameter_groups[buffer.param_to_param_group[param.orig_param]]
            gbuf = group.main_grad_buffer
            if gbuf is not None and group.main_weight_buffer is None and gbuf.dtype != param.dtype:
                return False
        return True

    def __call__(self) -> None:
        gradients = self.buffer.dist_main_grad
        for group, dtype, items in self.groups:
            gbuf = group.main_grad_buffer
            flat = (gbuf.get_shard_from_local_buffer() if self.sharded else gbuf.data).to(dtype)
            for name, param, original, start, end in items:
                local = flat[start:end]
                grad = gradients.get(name)
                if grad is None:
                    grad = gradients[name] = make_fsdp_dtensor(
                        local_tensor=local,
                        param=original,
                        dist_index=self.buffer.dist_index,
                        is_sharded_param=self.sharded,
                        is_expert_param=group.is_expert_param,
                    )
                else:
                    grad._local_tensor = local.view(-1, *original.shape[1:]) if original.dim() > 1 else local
                param.grad = grad if end > start else None


def same_weight_layouts(buffer) -> bool:
    """Whether every main-weight buffer holds exactly its model-weight buffer's items at the same offsets, so that
    one copy per buffer is Megatron-FSDP's copy item by item (no FP8 weights, no transposed copies)."""
    for group in buffer.parameter_groups:
        mbuf, wbuf = group.main_weight_buffer, group.model_weight_buffer
        if mbuf is None:
            continue
        if wbuf is None or group.transpose_weight_buffer is not None or any(map(is_float8tensor, group.params)):
            return False
        if (wbuf.is_data_distributed, wbuf.data_size, wbuf.shard_bucket_index, wbuf.item_index_map) != (
            mbuf.is_data_distributed,
            mbuf.data_size,
            mbuf.shard_bucket_index,
            mbuf.item_index_map,
        ):
            return False
    return True


@torch.no_grad()
def copy_main_weights(buffer) -> None:
    """`copy_main_weights_to_model_weights` for buffers of the same layout (`same_weight_layouts`)."""
    for group in buffer.parameter_groups:
        if group.main_weight_buffer is not None:
            group.model_weight_buffer.data.copy_(group.main_weight_buffer.data)


class UndistributedBuffers:
    """Gradient buffers of a sharded strategy whose data-parallel group is one rank: every buffer on one GPU, and the
    experts' when expert parallelism spans the whole data-parallel group. Megatron-FSDP does not distribute such a
    buffer, so the gradients accumulate in it in place, and there is nothing to reduce; megatron-core 0.16.1 still
    "reduce-scatters" it after every microbatch's backward (a scaling pass, a copy into a new tensor of the
    buffer's size and an addition back, which counted the accumulated sum twice). Here those buckets skip the
    reduction (`skip_reduction`), and the averaging factor Megatron-FSDP would have applied to every microbatch's
    gradients (`gradient_scaling_factor`, where the loss is not per token) is applied to their sum once per step
    (`scale`). Hybrid sharding also reduces across the groups of replicas, which Megatron-FSDP does in the same
    step: there its reduction stays, with the buffer's factor halved so that the sum counts once."""

    def __init__(self, wrapped) -> None:
        self.pipeline = wrapped.module.grad_reduce_pipeline
        buffer = wrapped.module.param_and_grad_buffer
        sharded = buffer.ddp_config.data_parallel_sharding_strategy != "no_shard"
        self.buckets = {
            index
            for index, group in enumerate(buffer.parameter_groups)
            if sharded and group.main_grad_buffer is not None and not group.main_grad_buffer.is_data_distributed
        }
        self.hybrid = buffer.dist_index.use_hybrid_fsdp
        gbufs = [buffer.parameter_groups[index].main_grad_buffer for index in sorted(self.buckets)]
        if self.hybrid:
            for gbuf in gbufs:
                gbuf.gradient_scaling_factor = 0.5 * (gbuf.gradient_scaling_factor or 1.0)
            self.factors = []
        else:
            self.factors = [(g, g.gradient_scaling_factor) for g in gbufs if g.gradient_scaling_factor not in (None, 1)]

    def skip_reduction(self) -> None:
        """Make the pipeline's reduction of a bucket group leave out these buckets."""
        if self.hybrid or not self.buckets:
            return
        reduce, pipeline, skipped = self.pipeline._bucket_group_gradient_reduce, self.pipeline, self.buckets

        def reduce_distributed(bucket_group: list[int], *args, **kwargs) -> bool:
            for index in bucket_group:
                if index in skipped:
                    pipeline.bucket_grad_ready_params[index] = set()
            distributed = [index for index in bucket_group if index not in skipped]
            return reduce(distributed, *args, **kwargs) if distributed else True

        pipeline._bucket_group_gradient_reduce = reduce_distributed

    @torch.no_grad()
    def scale(self) -> None:
        for gbuf, factor in self.factors:
            gbuf.data.mul_(factor)


def install(wrapped) -> Callable:
    """Replace the wrapped model's per-parameter bookkeeping where `GradientViews` and `copy_main_weights` apply;
    returns the `finalize_model_grads_func` to give megatron-core's schedule."""
    buffer = wrapped.module.param_and_grad_buffer
    if same_weight_layouts(buffer):
        buffer.copy_main_weights_to_model_weights = lambda: copy_main_weights(buffer)
    attach = GradientViews(buffer) if GradientViews.applies_to(buffer) else buffer.update_main_grads
    undistributed = UndistributedBuffers(wrapped)
    undistributed.skip_reduction()
    deferred = False

    def update_main_grads() -> None:
        if not deferred:
            attach()

    buffer.update_main_grads = update_main_grads

    def finalize(model, num_tokens=None, pg_collection=None, force_all_reduce=False) -> None:
        """megatron-core's `finalize_model_grads`, with the gradients handed to the optimizer once, at the end.
        The division by the global token count is its own: where the count is zero it leaves the gradients as
        they are, and dividing by the count clamped to one does the same without reading it on the host."""
        nonlocal deferred
        deferred = True
        try:
            finalize_model_grads(model, None, pg_collection=pg_collection, force_all_reduce=force_all_reduce)
            undistributed.scale()
            if num_tokens is not None:
                group = (
                    pg_collection.dp_cp
                    if pg_collection is not None
                    else parallel_state.get_data_parallel_group(with_context_parallel=True)
                )
                torch.distributed.all_reduce(num_tokens, group=group)
                for chunk in model:
                    chunk.scale_gradients(1.0 / num_tokens.clamp(min=1))
        finally:
            deferred = False
        attach()

    return finalize
