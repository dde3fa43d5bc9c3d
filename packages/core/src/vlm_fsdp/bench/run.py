"""Run the systems on the same batches and collect their figures, in two settings: eight microbatches per
optimizer step (`train.global_batch_size=8`, as training runs) and one.

Every system sees the microbatches the loader produces for the config (same seed, same order, the recipe's
microbatch size), in bf16, with AdamW and the same learning rate; figures are averaged over the steps after the
warm-up. Tokens/s counts useful tokens, TFLOP/s and MFU come from `vlm_fsdp.plan.flops` on those batches for
every system, so the ratio of two is a ratio of time.

Each run (setting, variant, system) has a spawned process of its own: its GPU memory, its compiled code and
Liger's patches of transformers end with it, and a run that crashes or stops making progress is recorded as
such while the others still run.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from statistics import mean

import torch
from vlm_fsdp.bench.hf_baseline import build_hf, hf_inputs, liger_kernels
from vlm_fsdp.bench.report import SETTINGS, SYSTEMS, VARIANTS
from vlm_fsdp.bench.timing import VisionTimer
from vlm_fsdp.config.run import Config
from vlm_fsdp.data.loader import build_loader
from vlm_fsdp.known_warnings import silence
from vlm_fsdp.train.build import build
from vlm_fsdp.train.loop import Fetch, train_step
from vlm_fsdp.train.metrics import peak_tflops
from vlm_fsdp.train.parallel import Dist, init_distributed, shutdown


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


Tick = Callable[[], None]
"""Called after every step of a run (`run_isolated` watches it)."""


def _no_tick() -> None:
    pass


def bench_ours(
    config: Config, warmup: int, steps: int, profile_path: Path | None = None, tick: Tick = _no_tick
) -> dict:
    dist = init_distributed(config)
    try:
        return _measure_ours(config, dist, warmup, steps, profile_path, tick)
    finally:
        shutdown()


def _measure_ours(config: Config, dist: Dist, warmup: int, steps: int, profile_path: Path | None, tick: Tick) -> dict:
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
            tick()
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
    summary = _summary(rows)
    if trainable.compiled_graphs:
        summary["compiled_graphs"] = trainable.compiled_graphs()
    return summary


def bench_ours_bf16_adam(
    config: Config, warmup: int, steps: int, profile_path: Path | None = None, tick: Tick = _no_tick
) -> dict:
    bf16_adam = replace(config, ddp=replace(config.ddp, preserve_fp32_weights=False))
    return bench_ours(bf16_adam, warmup, steps, profile_path, tick)


def bench_liger(
    config: Config, warmup: int, steps: int, profile_path: Path | None = None, tick: Tick = _no_tick
) -> dict:
    with liger_kernels():
        return bench_transformers(config, warmup, steps, profile_path, tick, liger=True)


def bench_transformers(
    config: Config,
    warmup: int,
    steps: int,
    profile_path: Path | None = None,
    tick: Tick = _no_tick,
    *,
    liger: bool = False,
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
        flops = sum(b.training_flops(config.model) for b in batches)
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
            tick()
            if index > warmup:
                rows.append(figures)
        if profile_path:
            _profile(step, profile_path)
    finally:
        loader.close()
    return _summary(rows)


RUNNERS = dict(zip(SYSTEMS, (bench_ours, bench_ours_bf16_adam, bench_transformers, bench_liger), strict=True))

STEP_TIMEOUT_S = 300.0
"""A run whose process finishes no step for this long (the first includes compiling) is ended and recorded."""


def _child(runner: Callable[..., dict], args: tuple, pipe) -> None:
    silence()
    try:
        pipe.send(("done", runner(*args, tick=lambda: pipe.send(("step", None)))))
    except torch.OutOfMemoryError as error:
        pipe.send(("error", f"out of GPU memory: {str(error).splitlines()[0]}"))
    except BaseException as error:  # reported to the parent, which records it and goes on
        pipe.send(("error", f"{type(error).__name__}: {error}"))
        raise


def run_isolated(
    runner: Callable[..., dict], *args, step_timeout_s: float = STEP_TIMEOUT_S, on_step: Tick = _no_tick
) -> dict:
    """`runner(*args)` in a spawned process; its figures, or `{"error": why}` when it raised, died or finished no
    step for `step_timeout_s` seconds (then it is ended)."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(runner, args, send))  # not a daemon: the loader has workers
    process.start()
    send.close()
    try:
        while True:
            if not receive.poll(step_timeout_s):
                process.kill()
                return {"error": f"no step finished in {step_timeout_s:.0f} s; the run was ended"}
            try:
                kind, value = receive.recv()
            except EOFError:
                process.join()
                return {"error": f"the run's process ended with exit code {process.exitcode} before reporting"}
            if kind == "step":
                on_step()
            else:
                return value if kind == "done" else {"error": value}
    finally:
        receive.close()
        if process.is_alive():
            process.join(timeout=30)
        if process.is_alive():
            process.kill()
            process.join()


def run_bench(
    config: Config,
    *,
    warmup: int,
    steps: int,
    systems: tuple[str, ...],
    settings: tuple[str, ...],
    variants: tuple[str, ...] = tuple(VARIANTS),
    profile_dir: Path | None = None,
    progress: Callable[[dict], None] | None = None,
    on_step: Tick = _no_tick,
) -> dict:
    """Figures per setting (`SETTINGS`), variant (`VARIANTS`) and system (`RUNNERS`), each run in a process
    of its own (`run_isolated`); a run that runs out of GPU memory or fails is recorded as such and the others
    still run. `progress` gets the results so far after each run, `on_step` is called after each step."""
    results = {}
    for setting in settings:
        step_batch = SETTINGS[setting] * config.train.micro_batch_size
        results[setting] = {}
        for variant in variants:
            text_only = VARIANTS[variant]
            variant_config = replace(
                config,
                data=replace(config.data, text_only=text_only),
                train=replace(config.train, global_batch_size=step_batch),
            )
            results[setting][variant] = {}
            for system in systems:
                name = f"profile_{system}_{variant}_{SETTINGS[setting]}mb.txt"
                path = profile_dir / name if profile_dir else None
                figures = run_isolated(RUNNERS[system], variant_config, warmup, steps, path, on_step=on_step)
                results[setting][variant][system] = figures
                if progress:
                    progress(results)
    return results
