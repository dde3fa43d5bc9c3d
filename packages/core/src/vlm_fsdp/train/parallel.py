"""Everything that makes a run span ranks, in the order it happens. Read top to bottom:

1. Process groups (`init_distributed`): torch.distributed (NCCL on GPUs, gloo without) and Megatron-Core's parallel
   state. Without tensor, context or pipeline parallelism every rank is a data-parallel rank; expert parallelism
   splits the experts of every MoE layer over groups of `model.expert_model_parallel_size` consecutive ranks
   (best inside one NVLink domain, for the all-to-all), and the ranks that hold the same experts form the expert-data-
   parallel group (world size / EP ranks).
2. Seeds (`seed_everything`): the same seed on every rank, for the data order and dropout. Initial weights do not
   depend on it through the RNG's position: every module is initialised from its own seed and every expert from
   its global index (`vlm_fsdp.model.init`), so a seed gives the same model on any number of ranks and any expert
   layout.
3. Wrap (`wrap`): Megatron-FSDP through megatron-core's adapter, with the decoder layers and the vision tower as
   FSDP units. Dense parameters are sharded over the data-parallel group, experts over the expert-data-parallel
   group; a meta-device model is materialised unit by unit, then sharded. Tokens reach experts on other ranks
   through Megatron-Core's all-to-all (or all-gather) dispatcher over the expert-parallel group.
4. The step's contract with megatron-core (`wrap`): its forward/backward schedule skips gradient reduction for all
   microbatches but the last (`no_sync`), and `finalize_model_grads` finishes the reduction and, with
   `model.calculate_per_token_loss`, divides every gradient by the global number of loss tokens, the router's
   load-balancing loss included (which Megatron's router scales by the microbatch's tokens for exactly this).
   The division is done after megatron-core's `finalize_model_grads`, on the GPU, and Megatron-FSDP's bookkeeping
   around the step, handing the gradients to the optimizer and the updated weights back, goes by buffer rather than
   by parameter; a gradient buffer whose data-parallel group is one rank is not reduced at all
   (`vlm_fsdp.train.step_bookkeeping`). Where every weight lies whole on this rank (one GPU), Megatron-FSDP's hooks
   that gather and release the units' weights are removed, and each parameter's gradient hook adds into a slice of
   the gradient buffer found once (`vlm_fsdp.train.resident_weights`).
5. A workaround for megatron-core 0.16.1: frozen parameters get no gradient hook (`_no_hooks_on_frozen_parameters`).
6. Optimizer (`build_optimizer`): Megatron's distributed optimizer over the sharded fp32 main weights, with Adam
   state for every parameter on every rank, also where a rank's shard of a parameter is empty, (a workaround
   again) replicated gradients counted once in the gradient norm (`_count_replicas_once`), and no update from a
   gradient whose norm is not finite (`_skip_non_finite_updates`).
"""

from __future__ import annotations

import math
import os
import random
import socket
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallelConfig, FullyShardedDataParallel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch.distributed.tensor import DTensor, Replicate
from torch.utils.hooks import RemovableHandle
from vlm_fsdp.config.run import Config
from vlm_fsdp.model.vision import VisionTower
from vlm_fsdp.train import step_bookkeeping
from vlm_fsdp.train.resident_weights import use_resident_buffers


@dataclass(frozen=True)
class Dist:
    """Where this rank sits in the run."""

    rank: int
    world_size: int
    local_rank: int
    dp_rank: int
    """Rank in the data-parallel group (every rank: each one reads its own microbatches)."""
    dp_size: int
    ep_rank: int
    """Rank in the expert-parallel group: this rank holds experts [ep_rank x E / ep_size, (ep_rank + 1) x ...)."""
    ep_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# --- 1. process groups --------------------------------------------------------------------------------------


def init_distributed(config: Config) -> Dist:
    """Start this rank's process group (a single process needs no launcher) and Megatron's groups."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        # under torch.distributed.run the environment names the rendezvous; alone, this process is world 1
        alone = (
            {}
            if "WORLD_SIZE" in os.environ
            else {"init_method": f"tcp://127.0.0.1:{free_port()}", "rank": 0, "world_size": 1}
        )
        torch.distributed.init_process_group(
            "nccl" if cuda else "gloo",
            **alone,
            timeout=timedelta(minutes=config.dist.distributed_timeout_minutes),
            device_id=torch.device("cuda", local_rank) if cuda else None,
        )
    parallel_state.initialize_model_parallel(
        expert_model_parallel_size=config.model.expert_model_parallel_size,
        num_distributed_optimizer_instances=config.ddp.num_distributed_optimizer_instances,
        create_gloo_process_groups=False,
    )
    seed_everything(config.train.seed)
    return Dist(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        local_rank=local_rank,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
        ep_size=parallel_state.get_expert_model_parallel_world_size(),
        device=torch.device("cuda", local_rank) if cuda else torch.device("cpu"),
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# --- 2. seeds -----------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        model_parallel_cuda_manual_seed(seed)


# --- 3 and 4. Megatron-FSDP wrap and the step's hooks -------------------------------------------------------


def ddp_config(config: Config) -> DistributedDataParallelConfig:
    d = config.ddp
    return DistributedDataParallelConfig(
        use_megatron_fsdp=True,
        use_distributed_optimizer=bool(d.use_distributed_optimizer),
        data_parallel_sharding_strategy=d.data_parallel_sharding_strategy,
        outer_dp_sharding_strategy=d.outer_dp_sharding_strategy,
        num_distributed_optimizer_instances=d.num_distributed_optimizer_instances,
        overlap_grad_reduce=bool(d.overlap_grad_reduce),
        overlap_param_gather=bool(d.overlap_param_gather),
        grad_reduce_in_fp32=d.grad_reduce_in_fp32,
        preserve_fp32_weights=d.preserve_fp32_weights,
        fsdp_double_buffer=d.fsdp_double_buffer,
        nccl_ub=d.nccl_ub,
        check_for_nan_in_grad=True,
        # the in-place scaling that step_bookkeeping.UndistributedBuffers relies on under hybrid sharding
        gradient_reduce_div_fusion=False,
    )


def wrap(model: torch.nn.Module, tc: TransformerConfig, config: Config, device: torch.device):
    """`model` under Megatron-FSDP, with megatron-core's step hooks set on `tc` (the model's config)."""
    with _no_hooks_on_frozen_parameters():
        wrapped = FullyShardedDataParallel(
            config=tc,
            ddp_config=ddp_config(config),
            module=model,
            fsdp_unit_modules=[TransformerLayer, VisionTower],
            device=device,
        )
    use_resident_buffers(wrapped.module)
    tc.no_sync_func = wrapped.no_sync
    tc.finalize_model_grads_func = step_bookkeeping.install(wrapped)
    return wrapped


# --- 5. megatron-core 0.16.1 workarounds --------------------------------------------------------------------


@contextmanager
def _no_hooks_on_frozen_parameters() -> Iterator[None]:
    """megatron-core 0.16.1's Megatron-FSDP registers a post-accumulate-grad hook on every parameter of a unit, and
    torch refuses one on a parameter that needs no gradient: a model with a frozen part (`model.freeze_*`) failed to
    wrap. While it wraps, such a parameter gets a handle that removes nothing instead."""
    register = torch.Tensor.register_post_accumulate_grad_hook

    def unless_frozen(tensor: torch.Tensor, hook) -> RemovableHandle:
        return register(tensor, hook) if tensor.requires_grad else RemovableHandle(OrderedDict())

    torch.Tensor.register_post_accumulate_grad_hook = unless_frozen
    try:
        yield
    finally:
        torch.Tensor.register_post_accumulate_grad_hook = register


# --- 6. optimizer -------------------------------------------------------------------------------------------


def build_optimizer(wrapped, config: Config, tc: TransformerConfig, device: torch.device):
    """Megatron's distributed optimizer (AdamW) with its state created for every parameter."""
    o = config.optimizer
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=o.lr,
            min_lr=o.min_lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            clip_grad=o.clip_grad,
            bf16=config.model.bf16,
            params_dtype=tc.params_dtype,
            use_distributed_optimizer=True,
        ),
        [wrapped],
        use_gloo_process_groups=False,
    )
    if device.type == "cuda":
        _use_fused_adam(optimizer)
    _create_adam_state(optimizer)
    if config.ddp.data_parallel_sharding_strategy == "no_shard":
        _count_replicas_once(optimizer)
    _skip_non_finite_updates(optimizer)
    return optimizer


def _use_fused_adam(optimizer) -> None:
    """Switch Megatron's fallback optimizer (torch's AdamW, used when neither Transformer Engine nor Apex is
    installed) from its multi-tensor implementation, whose temporaries add 4 bytes per parameter at the step,
    to torch's single-kernel fused one. Set before the first step, when the optimizer state is created."""
    for inner in _adam_optimizers(optimizer):
        for group in (inner.defaults, *inner.param_groups):
            group["fused"], group["foreach"] = True, False


def _create_adam_state(optimizer) -> None:
    """The state torch's AdamW would create at its first step, created now for every parameter. A rank whose
    Megatron-FSDP shard of a parameter is empty never gets a gradient for it, so AdamW would never create its
    state there; the ranks' state dicts would then differ and could not be saved together."""
    for inner in _adam_optimizers(optimizer):
        for group in inner.param_groups:
            fused = bool(group.get("fused") or group.get("capturable"))
            for param in group["params"]:
                state = inner.state[param]
                if state:
                    continue
                state["step"] = torch.zeros((), dtype=torch.float32, device=param.device if fused else "cpu")
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def _count_replicas_once(optimizer) -> None:
    """megatron-core 0.16.1's distributed optimizer sums every rank's squared gradients into the gradient norm,
    which is right for sharded gradients. Unsharded (`no_shard`), every rank of a data-parallel group holds the same
    whole gradients, and the norm, hence the clipping, came out sqrt(group size) times too large: only the group's
    first rank counts a replicated gradient (the sharded strategies replicate none, and skip this per-step pass
    over the parameters)."""
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        grads_for_norm = part.get_main_grads_for_grad_norm

        def first_replica_only(part=part, grads_for_norm=grads_for_norm) -> list[torch.Tensor]:
            replicas = {
                id(param.grad._local_tensor)
                for param in part.get_parameters()
                if isinstance(param.grad, DTensor)
                and all(isinstance(p, Replicate) for p in param.grad.placements)
                and param.grad.device_mesh.get_local_rank() != 0
            }
            return [grad for grad in grads_for_norm() if id(grad) not in replicas]

        part.get_main_grads_for_grad_norm = first_replica_only


def _skip_non_finite_updates(optimizer) -> None:
    """Megatron's optimizer skips a step only when its fp16 loss scaler finds an overflow; in bf16 and fp32 it would
    apply a NaN or infinite gradient. Its step computes the (global, so every rank agrees) gradient norm before it
    updates: an update is made only when that norm is finite, and `step()` then reports it as not successful."""
    grad_norm, update = optimizer.get_grad_norm, optimizer.step_with_ready_grads
    last = [0.0]

    def remembered_grad_norm():
        last[0] = grad_norm()
        return last[0]

    def update_if_finite() -> bool:
        return update() if math.isfinite(last[0]) else False

    optimizer.get_grad_norm, optimizer.step_with_ready_grads = remembered_grad_norm, update_if_finite


def _adam_optimizers(optimizer) -> list[torch.optim.AdamW]:
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [part.optimizer for part in parts if type(part.optimizer) is torch.optim.AdamW]
