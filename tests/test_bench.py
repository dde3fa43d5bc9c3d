"""`vlm-fsdp bench` on the CPU: the transformers baseline gets our batches with its own label convention, and
the report renders a table, a JSON record and a chart from measured figures."""

from __future__ import annotations

import json
import time

import pytest
import torch
from vlm_fsdp.bench.hf_baseline import build_hf, hf_inputs
from vlm_fsdp.bench.report import render, write
from vlm_fsdp.bench.run import _summary
from vlm_fsdp.cli.main import main
from vlm_fsdp.config import load_config
from vlm_fsdp.data.loader import build_loader


def test_transformers_baseline_trains_on_our_batches_with_the_same_loss_tokens():
    config = load_config("tiny", overrides=["data.num_workers=0", "train.micro_batch_size=2"])
    loader = build_loader(config)
    batch = next(loader)
    loader.close()
    inputs = hf_inputs(batch, config)
    # transformers predicts labels[t + 1] at position t: ours, shifted back by one
    assert torch.equal(inputs["labels"][:, 1:], batch.labels[:, :-1])
    assert (inputs["labels"] != -100).sum() == batch.num_loss_tokens - (batch.labels[:, -1] != -100).sum()
    model, optimizer = build_hf(config, torch.device("cpu"))
    loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and loss.item() > 0


def test_report_has_table_json_and_chart(tmp_path):
    figures = {
        "tokens_per_s": 1000.0,
        "tflops_per_gpu": 100.0,
        "mfu": 0.1,
        "peak_memory_gib": 10.0,
        "step_time_s": 1.0,
        "data_wait_s": 0.01,
        "vision_forward_s": 0.2,
        "optimizer_s": 0.05,
        "rest_s": 0.74,
        "loss": 3.0,
    }
    variants = {
        "images": {
            "vlm-fsdp": {**figures, "tokens_per_s": 5000.0},
            "transformers": figures,
            "transformers+liger": {**figures, "tokens_per_s": 2000.0},
        }
    }
    results = {"8 microbatches": variants, "1 microbatch": variants}
    table = render(results)
    assert table.count("vs transformers ") == 2 and "5.00x" in table
    assert table.count("vs transformers+liger") == 2 and "2.50x" in table
    assert table.index("8 microbatches") < table.index("1 microbatch")
    record, chart = write(results, {"recipe": "tiny", "device": "test"}, tmp_path)
    assert json.loads(record.read_text())["results"] == results
    assert chart.read_bytes().startswith(b"\x89PNG")


def test_a_system_that_ran_out_of_memory_is_reported_without_a_ratio(tmp_path):
    text = {"vlm-fsdp": {"error": "out of GPU memory: tried to allocate"}}
    text["transformers"] = {key: 1.0 for key in ("tokens_per_s", "tflops_per_gpu", "mfu")} | {
        key: 0.5
        for key in ("peak_memory_gib", "step_time_s", "data_wait_s", "vision_forward_s", "optimizer_s", "rest_s")
    }
    results = {"1 microbatch": {"text": text}}
    table = render(results)
    assert "vlm-fsdp            out of GPU memory" in table and "vs transformers" not in table
    _, chart = write(results, {"recipe": "tiny", "device": "test"}, tmp_path)
    assert chart.exists()


def test_bench_needs_a_gpu(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_summary_averages_steps_and_leaves_the_rest_to_the_language_model_and_backward():
    steps = [
        {"step_time_s": 1.0, "data_wait_s": 0.1, "vision_forward_s": 0.2, "optimizer_s": 0.1, "tokens_per_s": 10.0},
        {"step_time_s": 2.0, "data_wait_s": 0.1, "vision_forward_s": 0.4, "optimizer_s": 0.3, "tokens_per_s": 20.0},
    ]
    summary = _summary(steps)
    assert summary["tokens_per_s"] == 15.0 and summary["step_time_s"] == 1.5
    assert summary["rest_s"] == pytest.approx(1.5 - 0.1 - 0.3 - 0.2)


def test_liger_needs_its_extra_and_its_patch_stays_inside_the_liger_run(monkeypatch):
    import importlib.util

    from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe as module
    from vlm_fsdp.bench.hf_baseline import liger_kernels
    from vlm_fsdp.errors import UserError

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real(name, *a)
    )
    with pytest.raises(UserError, match="uv sync --extra bench"), liger_kernels():
        pass
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    rope = module.apply_rotary_pos_emb
    with liger_kernels():
        module.apply_rotary_pos_emb = None  # what Liger's patch does to the module
    assert module.apply_rotary_pos_emb is rope


def test_bench_runs_every_setting_variant_and_system_and_reports_progress(monkeypatch):
    """The orchestration alone (the systems need a GPU): each system gets the setting's microbatches per step and
    the variant's data, a failed run is recorded and the next still runs, progress follows every run."""
    from vlm_fsdp.bench import run

    seen, reported = [], []

    def in_process(runner, config, warmup, steps, path, *, on_step):
        seen.append((runner, config.train.global_batch_size, config.data.text_only))
        on_step()
        if runner is run.bench_transformers and config.data.text_only:
            return {"error": "out of GPU memory: Tried to allocate 9.27 GiB"}
        return {"tokens_per_s": 1.0}

    monkeypatch.setattr(run, "run_isolated", in_process)
    ticks = []
    config = load_config("qwen3_vl_30b_a3b_proxy")
    results = run.run_bench(
        config,
        warmup=1,
        steps=1,
        systems=run.SYSTEMS,
        settings=tuple(run.SETTINGS),
        progress=reported.append,
        on_step=lambda: ticks.append(1),
    )
    assert len(seen) == len(reported) == len(ticks) == 16
    assert {runner for runner, _, _ in seen} == set(run.RUNNERS.values())
    assert {(gbs, text) for _, gbs, text in seen} == {(8, False), (8, True), (1, False), (1, True)}
    assert results["8 microbatches"]["text"]["transformers"]["error"].startswith("out of GPU memory")
    assert results["1 microbatch"]["text"]["transformers+liger"] == {"tokens_per_s": 1.0}


def test_the_bf16_adam_system_is_vlm_fsdp_without_fp32_main_weights(monkeypatch):
    from vlm_fsdp.bench import run

    seen = []
    monkeypatch.setattr(run, "bench_ours", lambda config, *args: seen.append(config) or {"tokens_per_s": 1.0})
    config = load_config("qwen3_vl_30b_a3b_proxy")
    assert run.RUNNERS["vlm-fsdp-bf16-adam"](config, 1, 1) == {"tokens_per_s": 1.0}
    assert config.ddp.preserve_fp32_weights and not seen[0].ddp.preserve_fp32_weights
    assert seen[0].model == config.model and seen[0].optimizer == config.optimizer


def test_bench_runs_only_the_variants_asked_for(monkeypatch):
    from vlm_fsdp.bench import run

    seen = []

    def in_process(runner, config, warmup, steps, path, *, on_step):
        seen.append(config.data.text_only)
        return {"tokens_per_s": 1.0}

    monkeypatch.setattr(run, "run_isolated", in_process)
    config = load_config("qwen3_vl_30b_a3b_proxy")
    results = run.run_bench(
        config, warmup=1, steps=1, systems=run.SYSTEMS, settings=("8 microbatches",), variants=("text",)
    )
    assert seen == [True] * len(run.SYSTEMS)
    assert list(results["8 microbatches"]) == ["text"]


def test_each_run_has_a_process_whose_failure_or_hang_is_recorded():
    """Real spawned processes: figures and per-step progress come back; running out of memory and making no
    progress become the run's error instead of stopping the bench."""
    from vlm_fsdp.bench.run import run_isolated

    from tests import bench_runners

    ticks = []
    figures = run_isolated(bench_runners.steps_then_figures, 3, on_step=lambda: ticks.append(1))
    assert figures == {"tokens_per_s": 3.0} and len(ticks) == 3
    assert run_isolated(bench_runners.out_of_memory) == {
        "error": "out of GPU memory: CUDA out of memory. Tried to allocate 9.27 GiB"
    }
    start = time.perf_counter()
    hung = run_isolated(bench_runners.never_finishes_a_step, step_timeout_s=10)
    assert hung == {"error": "no step finished in 10 s; the run was ended"}
    assert time.perf_counter() - start < 60
