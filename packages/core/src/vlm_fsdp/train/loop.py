"""The training run, top to bottom: set up, (re)start, step loop with gradient accumulation, validation,
metrics and checkpoints; a stop signal ends it after the current step with a checkpoint (`stopping.py`), and a
step whose loss or gradient norm is not finite is skipped."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch
import yaml
from megatron.core.pipeline_parallel import get_forward_backward_func
from vlm_fsdp.checkpoint import training_state
from vlm_fsdp.checkpoint.layout import latest_checkpoint, resolve_checkpoint
from vlm_fsdp.config.load import to_yaml
from vlm_fsdp.config.overrides import to_dict
from vlm_fsdp.config.run import Config
from vlm_fsdp.config.validate import validate
from vlm_fsdp.data.batch import IGNORE_INDEX, Batch
from vlm_fsdp.data.loader import build_loader
from vlm_fsdp.errors import UserError
from vlm_fsdp.known_warnings import NOTICE
from vlm_fsdp.model.compat import HAVE_TE
from vlm_fsdp.provenance import provenance, write_run_record
from vlm_fsdp.train.build import Trainable, build
from vlm_fsdp.train.metrics import StepLogger, StepStats, peak_tflops
from vlm_fsdp.train.parallel import Dist, init_distributed, shutdown
from vlm_fsdp.train.stopping import StopRequest


def run_directories(config: Config) -> tuple[Path, Path]:
    """(output directory, checkpoint save directory)."""
    out = Path(config.train.output_dir)
    return out, Path(config.checkpoint.save) if config.checkpoint.save else out / "checkpoints"


def train(config: Config, *, resume: bool) -> list[StepStats]:
    """Run `config` on this rank; returns the step statistics (on every rank)."""
    if config.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # strict: with warn_only, flash attention keeps its non-deterministic backward
        torch.use_deterministic_algorithms(True)
    dist = init_distributed(config)
    try:
        return train_loop(config, dist, resume=resume)
    finally:
        shutdown()


def train_loop(config: Config, dist: Dist, *, resume: bool) -> list[StepStats]:
    """The run on this rank, whose process groups are started (`init_distributed`)."""
    validate(config, dist.world_size)
    out, save_dir = run_directories(config)
    if dist.is_main:
        write_run_record(out, config)
        print(to_yaml(config), flush=True)
        if not HAVE_TE:
            print(NOTICE, flush=True)
    trainable = build(config, dist.device)
    loader = build_loader(config, split="train", dp_rank=dist.dp_rank, dp_size=dist.dp_size)
    start = 0
    if resume:
        checkpoint = latest_checkpoint(save_dir)
        if checkpoint is None:
            raise UserError(f"--resume: no complete checkpoint under {save_dir}")
        start, data_state = training_state.load(checkpoint, trainable, dist.rank)
        loader.load_state_dict(data_state)
        _say(dist, f"resumed from {checkpoint} at step {start}")
    elif config.checkpoint.load:
        checkpoint = resolve_checkpoint(Path(config.checkpoint.load))
        training_state.load_model(checkpoint, trainable)
        _say(dist, f"loaded model weights from {checkpoint}")
    elif config.model.hf_path:
        from vlm_fsdp.checkpoint.hf_import import import_hf

        checkpoint = import_hf(Path(config.model.hf_path), out / "hf_import", config.model, dist)
        training_state.load_model(checkpoint, trainable)
        _say(dist, f"loaded Hugging Face weights from {config.model.hf_path}")

    logger = StepLogger(
        enabled=dist.is_main,
        tensorboard_dir=Path(config.logger.tensorboard_dir or out / "tensorboard"),
        wandb_project=config.logger.wandb_project,
        wandb_name=config.logger.wandb_exp_name or out.name,
        wandb_mode=config.logger.wandb_mode,
        config={"config": to_yaml(config)},
    )
    record = yaml.safe_dump(to_dict(config) | {"provenance": provenance()}, sort_keys=False)
    history = []
    peak = peak_tflops(dist.device)
    microbatches = config.train.global_batch_size // (config.train.micro_batch_size * dist.dp_size)

    def save(step: int) -> Path:
        path = training_state.save(
            save_dir=save_dir,
            step=step,
            trainable=trainable,
            loader_state=loader.state_dict(),
            run_record=record,
            keep=config.checkpoint.most_recent_k,
            rank=dist.rank,
        )
        _say(dist, f"saved checkpoint {path}")
        return path

    bad_steps = 0
    try:
        with StopRequest() as stop:
            for step in range(start + 1, config.train.train_iters + 1):
                stats = train_step(config, trainable, loader, dist, step, microbatches, peak, stop=stop)
                history.append(stats)
                if step % config.logger.log_interval == 0 or step == config.train.train_iters or stats.skipped:
                    logger.step(stats)
                bad_steps = bad_steps + 1 if stats.skipped else 0
                if bad_steps >= config.train.max_bad_steps:
                    raise UserError(
                        f"{bad_steps} steps in a row (train.max_bad_steps={config.train.max_bad_steps}) had a loss or "
                        f"gradient norm that is not finite (last: step {step}, loss {stats.loss}, gradient norm "
                        f"{stats.grad_norm}); none of them changed the weights. Lower optimizer.lr, check the data "
                        "for broken samples, or resume from the latest checkpoint"
                    )
                if config.train.eval_interval and step % config.train.eval_interval == 0:
                    logger.validation(step, evaluate(config, trainable, dist))
                interval = config.checkpoint.save_interval
                saved = (interval and step % interval == 0) or step == config.train.train_iters
                if saved:
                    save(step)
                if stats.stop_signal:
                    if not saved:
                        save(step)
                    _say(dist, f"stopped after step {step} on {stats.stop_signal}; continue with --resume")
                    break
    finally:
        logger.close()
        loader.close()
    return history


def train_step(
    config: Config,
    t: Trainable,
    loader,
    dist: Dist,
    step: int,
    microbatches: int,
    peak,
    *,
    stop: StopRequest | None = None,
) -> StepStats:
    """One optimizer step over `microbatches` microbatches of `loader` on every rank. The update is skipped (and
    the schedule does not advance) when the loss or the gradient norm is not finite; `stop`: this rank's signals,
    which every rank learns of through the loss's all-reduce."""
    torch.cuda.reset_peak_memory_stats(dist.device)
    start = time.perf_counter()
    skipped_before = sum(loader.stats.skipped.values())
    fetch = Fetch(loader, dist.device)
    loss_sum = forward_backward(config, t, fetch, microbatches)
    batches = fetch.batches
    counts = [
        sum(b.num_loss_tokens for b in batches),
        sum(b.num_tokens for b in batches),
        sum(b.training_flops(config.model) for b in batches),
    ]
    stopping = float(stop is not None and stop.received is not None)
    # one all-reduce per step, after the backward pass, which the update waits for anyway
    host = torch.tensor([*counts, stopping], dtype=torch.float64).to(dist.device, non_blocking=True)
    shared = torch.cat([host, loss_sum.double().reshape(1)])
    torch.distributed.all_reduce(shared)
    loss_tokens, tokens, flops, stop_votes, loss_sum = shared.tolist()
    loss_value = loss_sum / max(loss_tokens, 1.0)
    optimizer_start, optimizer_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    optimizer_start.record()
    updated, grad_norm = False, float("nan")
    if math.isfinite(loss_value):
        updated, grad_norm, _ = t.optimizer.step()
    optimizer_end.record()
    if updated:
        t.scheduler.step(increment=1)
    optimizer_end.synchronize()  # the update's last kernels may still run: the step ends when they have
    elapsed = time.perf_counter() - start
    tflops = flops / elapsed / dist.world_size / 1e12
    return StepStats(
        step=step,
        loss=loss_value,
        grad_norm=float(grad_norm if grad_norm is not None else "nan"),
        lr=t.optimizer.param_groups[0]["lr"],
        tokens_per_s=tokens / elapsed,
        tflops_per_gpu=tflops,
        mfu=tflops / peak if peak else None,
        peak_memory_gib=torch.cuda.max_memory_allocated(dist.device) / 2**30,
        data_wait_share=fetch.wait_s / elapsed,
        step_time_s=elapsed,
        optimizer_time_s=optimizer_start.elapsed_time(optimizer_end) / 1000,
        skipped_images=sum(loader.stats.skipped.values()) - skipped_before,
        compiled_graphs=t.compiled_graphs() if t.compiled_graphs else None,
        skipped=not updated,
        stop_signal=(stop.received.name if stop is not None and stop.received else "a signal") if stop_votes else None,
    )


class Fetch:
    """This step's microbatches, each taken from `source` (the loader) when the schedule reaches it, so that the
    workers keep preparing the next ones while the GPU computes; with the time spent waiting for them."""

    def __init__(self, source: Iterator[Batch], device: torch.device):
        self.source, self.device = source, device
        self.batches: list[Batch] = []
        self.wait_s = 0.0

    def __call__(self) -> Batch:
        start = time.perf_counter()
        batch = next(self.source).to(self.device)
        self.wait_s += time.perf_counter() - start
        self.batches.append(batch)
        return batch


def forward_backward(config: Config, t: Trainable, fetch: Fetch, microbatches: int) -> torch.Tensor:
    """Zero the gradients and run megatron-core's forward/backward schedule over `microbatches` microbatches of
    `fetch`, which also finalises the gradients (`vlm_fsdp.train.parallel`, step 4): reduced over the ranks and,
    with `model.calculate_per_token_loss`, divided by the global number of loss tokens. Returns this rank's summed
    per-token loss."""
    t.optimizer.zero_grad()  # under Megatron-FSDP this also zeroes the wrapped model's gradient buffers

    def loss(batch: Batch, token_losses: torch.Tensor):
        summed = token_losses.sum()
        # counted on the GPU: a tensor made from the host's count would make the host wait for the GPU
        tokens = (batch.labels != IGNORE_INDEX).sum().to(torch.int)
        # the schedule divides the loss in place when the loss is per microbatch; the log keeps the sum
        return summed, tokens, {"loss_sum": summed.detach().clone()}

    def forward_step(_, model):
        batch = fetch()
        return model(batch), partial(loss, batch)

    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=None,
        model=t.wrapped,
        num_microbatches=microbatches,
        seq_length=config.model.seq_length,
        micro_batch_size=config.train.micro_batch_size,
    )
    return torch.stack([out["loss_sum"] for out in outputs]).sum()


@torch.no_grad()
def evaluate(config: Config, t: Trainable, dist: Dist) -> float:
    """Mean per-token validation loss over `train.eval_iters` microbatches per rank."""
    loader = build_loader(config, split="val", dp_rank=dist.dp_rank, dp_size=dist.dp_size)
    totals = torch.zeros(2, dtype=torch.float64, device=dist.device)
    t.wrapped.eval()
    try:
        for index, batch in enumerate(loader):
            if index == config.train.eval_iters:
                break
            batch: Batch = batch.to(dist.device)
            totals[0] += t.wrapped(batch).sum().double()
            totals[1] += batch.num_loss_tokens
    finally:
        loader.close()
        t.wrapped.train()
    torch.distributed.all_reduce(totals)
    return (totals[0] / totals[1].clamp(min=1)).item()


def _say(dist: Dist, message: str) -> None:
    if dist.is_main:
        print(message, flush=True)
