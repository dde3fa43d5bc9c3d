"""What the spawned CPU ranks run (`tests.gloo.ranks`): the real model, Megatron-FSDP wrap, distributed optimizer,
training step and checkpoints of the product, on the tiny recipe in fp32 with 512-token sequences and the bundled
data. Each job returns rank 0's result: full (unsharded) tensors gathered from every rank, losses, gradient norms.
"""

from __future__ import annotations

import inspect
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import torch
from megatron.core import parallel_state
from torch.distributed.tensor import DTensor
from vlm_fsdp.checkpoint import training_state
from vlm_fsdp.checkpoint.layout import PARTIAL, finalize, resolve_checkpoint
from vlm_fsdp.config import load_config
from vlm_fsdp.data.loader import build_loader
from vlm_fsdp.train.build import Trainable, build
from vlm_fsdp.train.loop import Fetch, forward_backward, train_loop, train_step
from vlm_fsdp.train.parallel import Dist, init_distributed

# fp32, one sequence per microbatch, four per optimizer step: 4 microbatches on 1 rank, 2 each on 2, 1 each on 4
BASE = [
    "model.bf16=false",
    "model.seq_length=512",
    "model.moe_aux_loss_coeff=0.01",
    "data.num_workers=0",
    "train.global_batch_size=4",
    "train.micro_batch_size=1",
    "train.train_iters=4",
    "optimizer.lr_warmup_iters=1",
    "checkpoint.most_recent_k=5",
    "dist.distributed_timeout_minutes=3",
]


def _start(overrides, output_dir: str) -> tuple:
    config = load_config("tiny", overrides=[*BASE, f"train.output_dir={output_dir}", *overrides])
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    dist = init_distributed(config)
    return config, dist, build(config, dist.device)


def full_tensors(tree: dict[str, DTensor], trainable: Trainable) -> dict[str, torch.Tensor] | None:
    """The global tensors of a flat dict of sharded tensors, assembled on rank 0 (None elsewhere)."""
    views = training_state.as_global({"t": tree}, trainable.model)["t"]
    pieces = [
        (name, tuple(v.shape), tuple(v._local_tensor.__create_chunk_list__()[0].offsets), v.to_local().detach().clone())
        for name, v in views.items()
    ]
    gathered = [None] * torch.distributed.get_world_size() if torch.distributed.get_rank() == 0 else None
    torch.distributed.gather_object(pieces, gathered, dst=0)
    if gathered is None:
        return None
    out, covered = {}, {}
    for rank_pieces in gathered:
        for name, shape, offsets, local in rank_pieces:
            target = out.setdefault(name, torch.zeros(shape, dtype=local.dtype))
            rows = covered.setdefault(name, torch.zeros(shape[0], dtype=torch.bool))
            target[offsets[0] : offsets[0] + local.shape[0]] = local
            rows[offsets[0] : offsets[0] + local.shape[0]] = True
    assert all(rows.all() for rows in covered.values()), "the ranks' pieces do not cover the global tensors"
    return out


def _gradients(trainable: Trainable) -> dict[str, torch.Tensor] | None:
    return full_tensors(dict(trainable.wrapped.module.param_and_grad_buffer.dist_main_grad), trainable)


def _weights(trainable: Trainable) -> dict[str, torch.Tensor] | None:
    return full_tensors(training_state.model_state(trainable.wrapped), trainable)


def first_step(*, output_dir: str, overrides: list[str] = ()) -> dict:
    """One training step from the seed, without gradient clipping: the initial weights, the step's gradients, their
    norm, the loss, and the image patches of every rank's microbatches."""
    config, dist, t = _start(["optimizer.clip_grad=0.0", *overrides], output_dir)
    initial = _weights(t)
    loader = build_loader(config, dp_rank=dist.dp_rank, dp_size=dist.dp_size)
    patches = []
    microbatches = config.train.global_batch_size // (config.train.micro_batch_size * dist.dp_size)
    try:
        stats = train_step(config, t, _Counting(loader, patches), dist, 1, microbatches, None)
    finally:
        loader.close()
    return {
        "initial": initial,
        "gradients": _gradients(t),
        "grad_norm": stats.grad_norm,
        "loss": stats.loss,
        "patches": _gather(sum(patches), dist),
    }


class _Counting:
    """The loader, counting the image patches of the microbatches this rank takes."""

    def __init__(self, loader, patches: list[int]) -> None:
        self.loader, self.patches, self.stats = loader, patches, loader.stats

    def __next__(self):
        batch = next(self.loader)
        self.patches.append(sum(batch.image_patches))
        return batch


class Poisoned:
    """The loader, with NaN pixels in every microbatch that has images among the `count` it hands out from the
    `first`-th (0-based) on: a broken sample, as a corrupt decode or an overflow would make one."""

    def __init__(self, loader, first: int | None, count: int) -> None:
        self.loader, self.stats = loader, loader.stats
        self.first, self.count, self.taken, self.poisoned = first, count, 0, 0

    def __next__(self):
        batch = next(self.loader)
        if self.first is not None and self.first <= self.taken < self.first + self.count and batch.has_images:
            batch.pixel_values = torch.full_like(batch.pixel_values, float("nan"))
            self.poisoned += 1
        self.taken += 1
        return batch


def poisoned_step(*, output_dir: str, overrides: list[str] = ()) -> dict:
    """Three steps; on the last rank the second step's microbatches with images carry NaN pixels. Returns whether
    each step was skipped, the losses, the learning rates, and whether the weights stayed the same over the
    skipped step and changed over the next."""
    config, dist, t = _start(overrides, output_dir)
    loader = build_loader(config, dp_rank=dist.dp_rank, dp_size=dist.dp_size)
    microbatches = config.train.global_batch_size // (config.train.micro_batch_size * dist.dp_size)
    last = dist.rank == dist.world_size - 1
    poisoned = Poisoned(loader, microbatches if last else None, microbatches)
    steps, weights = [], []
    try:
        for step in (1, 2, 3):
            steps.append(train_step(config, t, poisoned, dist, step, microbatches, None))
            weights.append(_weights(t))
    finally:
        loader.close()
    result = {
        "skipped": [s.skipped for s in steps],
        "losses": [s.loss for s in steps],
        "grad_norms": [s.grad_norm for s in steps],
        "lrs": [s.lr for s in steps],
        "poisoned": _gather(poisoned.poisoned, dist),
    }
    if dist.rank == 0:
        result["unchanged_over_the_skipped_step"] = all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])
        result["changed_over_the_next_step"] = any(not torch.equal(weights[1][n], weights[2][n]) for n in weights[0])
    return result


def preempted_run(*, output_dir: str, overrides: list[str] = ()) -> dict:
    """`run`, with SIGTERM sent to this rank once the step-2 checkpoint is complete (as a preemption would):
    returns the steps run, their losses, and the checkpoints left."""
    config = load_config("tiny", overrides=[*BASE, f"train.output_dir={output_dir}", "checkpoint.save_interval=2",
                                            *overrides])  # fmt: skip
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    dist = init_distributed(config)
    save = Path(output_dir) / "checkpoints"
    if dist.rank == 0:
        threading.Thread(target=_signal_when, args=(save / "iter_0000002", signal.SIGTERM), daemon=True).start()
    history = train_loop(config, dist, resume=False)
    return {
        "steps": [s.step for s in history],
        "losses": [s.loss for s in history],
        "stop_signals": [s.stop_signal for s in history],
        "checkpoints": sorted(p.name for p in save.iterdir()) if dist.rank == 0 else None,
    }


def _signal_when(path: Path, number: signal.Signals) -> None:
    while not path.is_dir():
        time.sleep(0.05)
    os.kill(os.getpid(), number)


def _gather(value, dist: Dist):
    out = [None] * dist.world_size if dist.rank == 0 else None
    torch.distributed.gather_object(value, out, dst=0)
    return out


def run(*, output_dir: str, overrides: list[str] = (), resume_from: str | None = None) -> dict:
    """`vlm-fsdp train`'s loop (`vlm_fsdp.train.loop`) on this layout, saving every 2 steps; with `resume_from`, it
    first puts that checkpoint into this run's save directory and resumes from it. Returns the steps' losses and
    gradient norms."""
    config = load_config("tiny", overrides=[*BASE, f"train.output_dir={output_dir}", "checkpoint.save_interval=2",
                                            *overrides])  # fmt: skip
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    dist = init_distributed(config)
    if resume_from and dist.rank == 0:
        source = Path(resume_from)
        save = Path(output_dir) / "checkpoints"
        save.mkdir(parents=True)
        shutil.copytree(source, save / f"{source.name}{PARTIAL}")
        finalize(save / f"{source.name}{PARTIAL}", save / source.name)
    torch.distributed.barrier()
    history = train_loop(config, dist, resume=resume_from is not None)
    return {"steps": [s.step for s in history], "losses": [s.loss for s in history],
            "grad_norms": [s.grad_norm for s in history]}  # fmt: skip


def load_weights(*, output_dir: str, checkpoint: str, overrides: list[str] = ()) -> dict:
    """The model weights after `checkpoint.load` of `checkpoint`."""
    _, _, t = _start(overrides, output_dir)
    training_state.load_model(resolve_checkpoint(Path(checkpoint)), t)
    return {"weights": _weights(t)}


def mixed_images(*, output_dir: str) -> dict:
    """One optimizer step over an image microbatch and a text-only one: on one rank both, on two ranks one each
    (rank 1 has no image at all). Returns the gradients and the loss."""
    config, dist, t = _start([], output_dir)
    batches = [_first(config, text_only=False), _first(config, text_only=True)]
    assert batches[0].has_images and not batches[1].has_images
    mine = batches if dist.world_size == 1 else [batches[dist.rank]]
    loss = forward_backward(config, t, Fetch(iter(mine), dist.device), len(mine))
    torch.distributed.all_reduce(loss)
    t.optimizer.step()
    return {"gradients": _gradients(t), "loss_sum": loss.item()}


def bookkeeping_against_megatron(*, output_dir: str, overrides: list[str] = ()) -> dict:
    """One step's forward and backward in bf16, twice over the same microbatches: with the buffer-wise bookkeeping
    of `vlm_fsdp.train.step_bookkeeping`, then with Megatron-FSDP's own per-parameter methods and megatron-core's
    `finalize_model_grads`; then the optimizer's update copied into the model weights by each. Returns, summed over
    the ranks, how many gradients handed to the optimizer and how many model weights differ in any bit, how many
    were compared and changed by the step, and whether the buffer-wise methods were in use on every rank."""
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from vlm_fsdp.train.step_bookkeeping import GradientViews

    config, dist, t = _start(["model.bf16=true", *overrides], output_dir)
    buffer = t.wrapped.module.param_and_grad_buffer
    ours = {name: vars(buffer)[name] for name in ("update_main_grads", "copy_main_weights_to_model_weights")}
    in_use = GradientViews.applies_to(buffer) and len(ours) == 2
    loader = build_loader(config, dp_rank=dist.dp_rank, dp_size=dist.dp_size)
    microbatches = config.train.global_batch_size // (config.train.micro_batch_size * dist.dp_size)
    try:
        batches = [next(loader) for _ in range(microbatches)]
    finally:
        loader.close()

    def gradients() -> dict:
        forward_backward(config, t, Fetch(iter(batches), dist.device), microbatches)
        return {n: p.grad.to_local().clone() for n, p in buffer.optimizer_named_parameters if p.grad is not None}

    def weights() -> list[torch.Tensor]:
        return [
            group.model_weight_buffer.get_item(item, only_shard=group.model_weight_buffer.is_data_distributed).clone()
            for group in buffer.parameter_groups
            if group.main_weight_buffer is not None
            for item in group.model_weight_buffer.param_idx.values()
        ]

    with_ours = gradients()
    tc = t.wrapped.config
    tc.finalize_model_grads_func, vlm_finalize = finalize_model_grads, tc.finalize_model_grads_func
    for name in ours:
        del vars(buffer)[name]
    with_megatron = gradients()
    before = weights()
    t.scheduler.step(increment=1)  # past the warm-up's learning rate of zero
    t.optimizer.step()
    by_megatron = weights()
    vars(buffer).update(ours)
    tc.finalize_model_grads_func = vlm_finalize
    for group in buffer.parameter_groups:
        if group.model_weight_buffer is not None:
            group.model_weight_buffer.data.zero_()
    buffer.copy_main_weights_to_model_weights()
    by_ours = weights()
    counts = torch.tensor(
        [
            len(with_ours.keys() ^ with_megatron.keys())
            + sum(not torch.equal(g, with_megatron[n]) for n, g in with_ours.items() if n in with_megatron),
            len(with_megatron),
            sum(not torch.equal(a, b) for a, b in zip(by_ours, by_megatron, strict=True)),
            sum(not torch.equal(a, b) for a, b in zip(before, by_megatron, strict=True)),
            int(not in_use),
        ]
    )
    torch.distributed.all_reduce(counts)
    keys = ("gradients_differing", "gradients_compared", "weights_differing", "weights_changed", "ranks_not_in_use")
    return dict(zip(keys, counts.tolist(), strict=True))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.to_local() if isinstance(tensor, DTensor) else tensor).detach().clone()


def bf16_weights_against_torch_adamw(*, output_dir: str, overrides: list[str] = ()) -> dict:
    """With `ddp.preserve_fp32_weights=false` in bf16: two training steps (the first at the warm-up's learning rate
    of zero), the second against torch's own AdamW applied to a copy of each rank's bf16 weight shards, with the
    optimizer's state before the step and the step's gradients. Returns, summed over the ranks, how many shards
    differ in any bit, how many were compared and how many the step changed, and the dtypes of the optimizer's
    weights, gradients and moments."""
    config, dist, t = _start(["model.bf16=true", "ddp.preserve_fp32_weights=false", *overrides], output_dir)
    loader = build_loader(config, dp_rank=dist.dp_rank, dp_size=dist.dp_size)
    microbatches = config.train.global_batch_size // (config.train.micro_batch_size * dist.dp_size)
    adams = [part.optimizer for part in getattr(t.optimizer, "chained_optimizers", [t.optimizer])]
    try:
        train_step(config, t, loader, dist, 1, microbatches, None)
        before = [
            (
                {k: group[k] for k in ("lr", "betas", "eps", "weight_decay")},  # the step's: the schedule moves on
                [(p, _local(p), {k: _local(v) for k, v in adam.state[p].items()}) for p in group["params"]],
            )
            for adam in adams
            for group in adam.param_groups
        ]
        train_step(config, t, loader, dist, 2, microbatches, None)
    finally:
        loader.close()
    differing = compared = changed = 0
    dtypes = set()
    for settings, params in before:
        for param, weight, state in params:
            if param.grad is None:
                continue
            copy = weight.clone().requires_grad_()
            copy.grad = param.grad.to_local()
            reference = torch.optim.AdamW([copy], **settings, foreach=False)
            reference.state[copy] = {k: v.clone() for k, v in state.items()}
            reference.step()
            updated = param.to_local().detach()
            differing += not torch.equal(copy.detach(), updated)
            compared += 1
            changed += not torch.equal(weight, updated)
            dtypes |= {
                str(updated.dtype),
                str(param.grad.dtype),
                *(str(v.dtype) for k, v in state.items() if k != "step"),
            }
    counts = torch.tensor([differing, compared, changed])
    torch.distributed.all_reduce(counts)
    keys = ("shards_differing", "shards_compared", "shards_changed")
    return dict(zip(keys, counts.tolist(), strict=True)) | {"dtypes": sorted(dtypes)}


def resident_weights_against_megatron(*, output_dir: str, steps: int = 2) -> dict:
    """`steps` training steps as the product builds the model, where Megatron-FSDP's weight gathering hooks are
    removed and its gradient hooks replaced if the buffers are resident (`vlm_fsdp.train.resident_weights`), then as
    many from the same seed with Megatron-FSDP's hooks as they come. Returns for each the losses, gradient norms,
    weights before and after, the names of the hooks left in the wrapped model's tables, the functions its modules'
    Megatron-FSDP hooks run and the functions of its gradient hooks."""
    from vlm_fsdp.train import parallel
    from vlm_fsdp.train.resident_weights import hook_handler

    def run(name: str) -> dict:
        config, dist, t = _start([], str(Path(output_dir) / name))
        fsdp = t.wrapped.module
        hooks = sorted(name for table in (fsdp.forward_pre_hooks, fsdp.forward_hooks, fsdp.backward_pre_hooks)
                       for name in table)  # fmt: skip
        gradient_hooks = [handle.hooks_dict_ref()[handle.id].__qualname__ for handle in fsdp.grad_acc_hooks.values()]
        module_hooks = sorted(
            hook_handler(hook).__name__
            for module in fsdp.module.modules()
            for hook in (*module._forward_pre_hooks.values(), *module._forward_hooks.values())
            if getattr(inspect.unwrap(hook), "__qualname__", "").startswith("MegatronFSDP.")
        )
        initial = _weights(t)
        loader = build_loader(config, dp_rank=dist.dp_rank, dp_size=dist.dp_size)
        microbatches = config.train.global_batch_size // (config.train.micro_batch_size * dist.dp_size)
        try:
            stats = [train_step(config, t, loader, dist, step, microbatches, None) for step in range(1, steps + 1)]
        finally:
            loader.close()
        return {
            "hooks": hooks,
            "gradient_hooks": gradient_hooks,
            "module_hooks": module_hooks,
            "losses": [s.loss for s in stats],
            "grad_norms": [s.grad_norm for s in stats],
            "initial": initial,
            "weights": _weights(t),
        }

    dropped = run("dropped")
    use, parallel.use_resident_buffers = parallel.use_resident_buffers, lambda fsdp: None
    try:
        kept = run("kept")
    finally:
        parallel.use_resident_buffers = use
    return {"dropped": dropped, "kept": kept}


def _first(config, *, text_only: bool):
    from dataclasses import replace

    loader = build_loader(replace(config, data=replace(config.data, text_only=text_only)))
    try:
        return next(loader)
    finally:
        loader.close()


def transformers_parity(*, output_dir: str) -> dict:
    """Gradients of one step over two microbatches, with the load-balancing loss on, against transformers'
    Qwen3-VL-MoE with the same weights (loaded through `vlm-fsdp convert hf-to-fsdp`). The reference objective is
    Megatron's: per microbatch, the summed token losses plus, for every MoE layer, its load-balancing loss times the
    microbatch's tokens, all divided by the loss tokens of the step. Returns, per parameter, the largest gradient
    difference relative to the largest reference gradient."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration
    from vlm_fsdp.checkpoint.hf_import import write_model_checkpoint
    from vlm_fsdp.model.hf_config import hf_config_dict
    from vlm_fsdp.model.hf_mapping import mapping

    from tests.parity import samples

    config, _, t = _start([], output_dir)
    m = config.model
    torch.manual_seed(0)
    hf = Qwen3VLMoeForConditionalGeneration._from_config(Qwen3VLMoeConfig(**hf_config_dict(m)), dtype=torch.float32)
    hf.save_pretrained(Path(output_dir) / "hf")
    checkpoint = write_model_checkpoint(Path(output_dir) / "hf", Path(output_dir) / "hf_import", m, point_latest=False)
    training_state.load_model(checkpoint, t)
    loader = build_loader(config)
    try:
        batches = [next(loader) for _ in range(2)]
    finally:
        loader.close()
    forward_backward(config, t, Fetch(iter(batches), torch.device("cpu")), len(batches))
    ours = _gradients(t)

    hf.config._attn_implementation = "eager"
    loss_tokens = sum(b.num_loss_tokens for b in batches)
    objective = torch.zeros(())
    for batch in batches:
        layer_logits = [[] for _ in range(m.num_layers)]
        for row, first, last, labels, inputs in samples(batch, config, padding=True):
            if "pixel_values" not in inputs:
                inputs["position_ids"] = batch.position_ids[:, row : row + 1, first:last]
            out = hf(**inputs, output_router_logits=True)
            target = labels != -100
            if target.any():
                objective = objective + torch.nn.functional.cross_entropy(
                    out.logits[0][target], labels[target], reduction="sum"
                )
            for layer, logits in enumerate(out.router_logits):
                layer_logits[layer].append(logits)
        tokens = batch.input_ids.numel()
        for logits in layer_logits:
            probs = torch.softmax(torch.cat(logits).float(), dim=-1)
            routed = torch.zeros_like(probs).scatter_(1, probs.topk(m.moe_router_topk, dim=-1).indices, 1.0)
            scale = m.num_moe_experts * m.moe_aux_loss_coeff / (m.moe_router_topk * tokens * tokens)
            objective = objective + tokens * scale * (probs.sum(0) * routed.sum(0)).sum()
    (objective / loss_tokens).backward()
    hf_grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in hf.named_parameters()}
    differences = {}
    for entry in mapping(m):
        expected = entry.to_ours([hf_grads[n] for n in entry.hf], m)
        got = ours[entry.ours].reshape(expected.shape)
        differences[entry.ours] = ((got - expected).abs().max() / expected.abs().max().clamp(min=1e-12)).item()
    return {"relative_differences": differences}
