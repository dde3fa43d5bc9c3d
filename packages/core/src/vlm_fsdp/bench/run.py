"""Run the systems on the same batches and collect their figures, in two settings: eight microbatches per
optimizer step (`train.global_batch_size=8`, as training runs) and one.

Every system sees the microbatches the loader produces for the config (same seed, same order, the recipe's
microbatch size), in bf16, with AdamW and the same learning rate; figures are averaged over the steps after the
warm-up. Tokens/s counts useful tokens, TFLOP/s and MFU come from `vlm_fsdp.plan.flops` on those batches for
every system, so the ratio of two is a ratio of time.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from statistics import mean

import torch
from vlm_fsdp.bench.hf_baseline import build_hf, hf_inputs, liger_kernels
from vlm_fsdp.bench.report import SETTINGS, SYSTEMS
from vlm_fsdp.bench.timing import VisionTimer
from vlm_fsdp.config.run import Config
from vlm_fsdp.data.loader import build_loader
from vlm_fsdp.plan.flops import training_flops
from vlm_fsdp.train.build import build
from vlm_fsdp.train.loop import Fetch, train_step
from vlm_fsdp.train.metrics import peak_tflops
from vlm_fsdp.train.parallel import Dist, init_distributed, release, shutdown


def _summary(steps: list[dict]) -> dict:
    """Means over the measured steps, and `rest_s`: what the measured parts leave of a step (the language model's
    forward and the backward of both towers)."""
    summary = {key: mean(step[key] for step in steps) for key in steps[0]}
    measured = ("data_wait_s", "vision_forward_s", "optimizer_s")
    summary["rest_s"] = summary["step_time_s"] - sum(summary[key] for key in measured)
    return summary


def _profile(step: Callable[[], object], path: Path) -> None:
    """Run one more step under the PyTorch profiler and write its tables of the costliest GPU kernels and host
    operations (host synchronisations show up as cudaStreamSynchronize / cudaMemcpyAsync time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    path.parent.mkdir(parents=True, exist_ok=True)
    averages = prof.key_averages()
    tables = [
        f"{title}\n{averages.table(sort_by=key, row_limit=30, max_name_column_width=70)}"
        for title, key in (("costliest GPU time", "cuda_time_total"), ("costliest host time", "self_cpu_time_total"))
    ]
    path.write_text("\n\n".join(tables))


def bench_ours(config: Config, warmup: int, steps: int, profile_path: Path | None = None) -> dict:
    dist = init_distributed(config)
    try:
        return _measure_ours(config, dist, warmup, steps, profile_path)
    finally:
        shutdown()
        gc.collect()  # the model is unreferenced once _measure_ours returns
        torch.cuda.empty_cache()


def _measure_ours(config: Config, dist: Dist, warmup: int, steps: int, profile_path: Path | None) -> dict:
    trainable = build(config, dist.device)
    timer = VisionTimer(trainable.model.vision)
    loader = build_loader(config, dp_rank=dist.dp_rank, dp_size=dist.dp_size)
    microbatches = config.train.global_batch_size // config.train.micro_batch_size
    peak = peak_tflops(dist.device)
    rows = []
    try:
        for step in range(1, warmup + steps + 1):
            stats = train_step(config, trainable, loader, dist, step, microbatches, peak)
            vision = timer.read()
            if step > warmup:
                rows.append(
                    {
                        "tokens_per_s": stats.tokens_per_s,
                        "tflops_per_gpu": stats.tflops_per_gpu,
                        "mfu": stats.mfu or 0.0,
                        "peak_memory_gib": stats.peak_memory_gib,
                        "step_time_s": stats.step_time_s,
                        "data_wait_s": stats.data_wait_share * stats.step_time_s,
                        "vision_forward_s": vision,
                        "optimizer_s": stats.optimizer_time_s,
                        "loss": stats.loss,
                    }
                )
        if profile_path:
            _profile(lambda: train_step(config, trainable, loader, dist, 0, microbatches, peak), profile_path)
    finally:
        loader.close()
        release(trainable.wrapped)
    summary = _summary(rows)
    if trainable.compiled_graphs:
        summary["compiled_graphs"] = trainable.compiled_graphs()
    return summary


def bench_liger(config: Config, warmup: int, steps: int, profile_path: Path | None = None) -> dict:
    with liger_kernels():
        return bench_transformers(config, warmup, steps, profile_path, liger=True)


def bench_transformers(
    config: Config, warmup: int, steps: int, profile_path: Path | None = None, *, liger: bool = False
) -> dict:
    device = torch.device("cuda")
    model, optimizer = build_hf(config, device, liger=liger)
    timer = VisionTimer(model.model.visual)
    loader = build_loader(config)
    microbatches = config.train.global_batch_size // config.train.micro_batch_size
    peak = peak_tflops(device)
    rows = []

    def step() -> dict:
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        fetch = Fetch(loader, device)
        loss_sum = torch.zeros((), device=device)
        for _ in range(microbatches):
            loss = model(**hf_inputs(fetch(), config)).loss / microbatches
            loss.backward()
            loss_sum += loss.detach()
        batches = fetch.batches
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after.record()
        loss_value = loss_sum.item()
        elapsed = time.perf_counter() - start
        vision = timer.read()
        tokens = sum(b.num_tokens for b in batches)
        flops = sum(training_flops(config.model, b.doc_lengths, b.image_patches) for b in batches)
        tflops = flops / elapsed / 1e12
        return {
            "tokens_per_s": tokens / elapsed,
            "tflops_per_gpu": tflops,
            "mfu": tflops / peak if peak else 0.0,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "step_time_s": elapsed,
            "data_wait_s": fetch.wait_s,
            "vision_forward_s": vision,
            "optimizer_s": before.elapsed_time(after) / 1000,
            "loss": loss_value,
        }

    try:
        for index in range(1, warmup + steps + 1):
            figures = step()
            if index > warmup:
                rows.append(figures)
        if profile_path:
            _profile(step, profile_path)
    finally:
        loader.close()
    model = optimizer = None  # the step closure holds them too
    gc.collect()
    torch.cuda.empty_cache()
    return _summary(rows)


RUNNERS = dict(zip(SYSTEMS, (bench_ours, bench_transformers, bench_liger), strict=True))


def run_bench(
    config: Config,
    *,
    warmup: int,
    steps: int,
    systems: tuple[str, ...],
    settings: tuple[str, ...],
    profile_dir: Path | None = None,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Figures per setting (`SETTINGS`), variant ("images", "text") and system (`RUNNERS`); a system that runs
    out of GPU memory is recorded as such and the others still run. `progress` gets the results so far after
    each system's run."""
    results = {}
    for setting in settings:
        step_batch = SETTINGS[setting] * config.train.micro_batch_size
        results[setting] = {}
        for variant, text_only in (("images", False), ("text", True)):
            variant_config = replace(
                config,
                data=replace(config.data, text_only=text_only),
                train=replace(config.train, global_batch_size=step_batch),
            )
            results[setting][variant] = {}
            for system in systems:
                name = f"profile_{system}_{variant}_{SETTINGS[setting]}mb.txt"
                path = profile_dir / name if profile_dir else None
                try:
                    figures = RUNNERS[system](variant_config, warmup, steps, path)
                except torch.OutOfMemoryError as error:
                    figures = {"error": f"out of GPU memory: {str(error).splitlines()[0]}"}
                    gc.collect()
                    torch.cuda.empty_cache()
                results[setting][variant][system] = figures
                if progress:
                    progress(results)
    return results
