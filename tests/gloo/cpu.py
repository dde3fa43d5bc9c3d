"""CPU stand-ins for the CUDA-only calls of megatron-core 0.16.1's Megatron-FSDP, optimizer and MoE dispatch, so that
the real wrap, distributed optimizer, gradient reduction and all-to-all run in CPU processes over gloo.

TEST SUPPORT ONLY: `install()` patches torch and megatron-core process-wide; call it first thing in a spawned test
process, never in the pytest process and never from the product.

- CUDA streams and events become no-ops, device queries answer for device 0;
- collectives finish before they return, `async_op=True` and coalesced ones included: gloo runs an asynchronous
  collective on its own threads, and Megatron-FSDP frees or reuses a buffer once a CUDA event says the stream has
  passed the collective, which a no-op event says at once: gloo would then write into freed memory (seen as heap
  corruption in a 4-rank run);
- the adapter's device meshes are built for the CPU;
- a TorchFunctionMode maps `device='cuda'` / integer devices to the CPU (also during backward passes, which run
  inside the mode's handler), `Tensor.cuda` is the identity, and `Tensor.type()` names CPU float tensors as CUDA
  ones, which megatron-core's gradient clipping asserts;
- the all-to-all dispatcher's split sizes become numpy arrays, as its device-to-host copy would make them.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.overrides import TorchFunctionMode


class _Event:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def record(self, *args) -> None:
        pass

    def wait(self, *args) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


class _Stream(_Event):
    def wait_stream(self, *args) -> None:
        pass

    def wait_event(self, *args) -> None:
        pass

    def record_event(self, *args) -> _Event:
        return _Event()


def _on_cpu(device):
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _run_backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False, inputs=None, gradient=None):
    """`torch.autograd.backward` without its torch-function dispatch (which would re-enter the mode)."""
    from torch.autograd import _make_grads, graph

    tensors = (tensors,) if torch.is_tensor(tensors) else tuple(tensors)
    grad_tensors = gradient if gradient is not None else grad_tensors
    grads = (grad_tensors,) if grad_tensors is None or torch.is_tensor(grad_tensors) else tuple(grad_tensors)
    if len(grads) == 1 and len(tensors) > 1:
        grads = grads * len(tensors)
    grads = _make_grads(tensors, grads, is_grads_batched=False)
    retain_graph = create_graph if retain_graph is None else retain_graph
    inputs = () if inputs is None else ((inputs,) if torch.is_tensor(inputs) else tuple(inputs))
    graph._engine_run_backward(
        tensors, grads, retain_graph, create_graph, inputs, allow_unreachable=True, accumulate_grad=True
    )


class _CudaOnCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.backward, torch.autograd.backward):
            # the mode is off inside this handler: keep it on for the backward pass
            with self:
                return _run_backward(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs:
            kwargs["device"] = _on_cpu(kwargs["device"])
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _on_cpu(args[1]), *args[2:])
        return func(*args, **kwargs)


class _CpuDeviceMesh:
    @staticmethod
    def from_group(*args, device_type: str = "cuda", **kwargs):
        from torch.distributed.device_mesh import DeviceMesh

        return DeviceMesh.from_group(*args, device_type="cpu", **kwargs)


def _split_sizes_on_host(tensor, as_numpy: bool = False, record_stream: bool = False):
    return tensor.numpy() if as_numpy and torch.is_tensor(tensor) else tensor


COLLECTIVES = ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce", "all_gather", "broadcast",
               "all_to_all_single", "reduce_scatter")  # fmt: skip


def _finished(collective):
    from torch.distributed.distributed_c10d import _IllegalWork

    @functools.wraps(collective)
    def run(*args, async_op: bool = False, **kwargs):
        work = collective(*args, async_op=async_op, **kwargs)
        if async_op and work is not None and not isinstance(work, _IllegalWork):  # _IllegalWork: being coalesced
            work.wait()
        return work

    return run


@contextlib.contextmanager
def _coalescing_finished(group=None, device=None, async_ops: bool = False):
    from torch.distributed.distributed_c10d import _coalescing_manager

    with _coalescing_manager(group, device, async_ops=False) as manager:
        yield manager


def install() -> None:
    """Patch this process for Megatron-FSDP on CPU (see the module docstring)."""
    import megatron.core.distributed.fsdp.mcore_fsdp_adapter as adapter
    import megatron.core.distributed.fsdp.src.megatron_fsdp.param_and_grad_buffer as fsdp_buffers
    import megatron.core.distributed.param_and_grad_buffer as ddp_buffers
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    cuda = torch.cuda
    cuda.Stream, cuda.Event = _Stream, _Event
    cuda.current_stream = cuda.default_stream = lambda *args, **kwargs: _Stream()
    cuda.stream = lambda stream: contextlib.nullcontext()
    cuda.current_device = lambda: 0
    cuda.set_device = cuda.synchronize = cuda.empty_cache = cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.max_memory_allocated = cuda.memory_allocated = cuda.memory_reserved = lambda *args, **kwargs: 0
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    adapter.DeviceMesh = _CpuDeviceMesh
    for name in COLLECTIVES:
        setattr(torch.distributed, name, _finished(getattr(torch.distributed, name)))
    for buffers in (fsdp_buffers, ddp_buffers):
        buffers._coalescing_manager = _coalescing_finished
    token_dispatcher.maybe_move_tensor_to_cpu = _split_sizes_on_host
    _CudaOnCpu().__enter__()
