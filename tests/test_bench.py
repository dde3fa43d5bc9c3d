"""`vlm-fsdp bench` on the CPU: the transformers baseline gets our batches with its own label convention, and
the report renders a table, a JSON record and a chart from measured figures."""

from __future__ import annotations

import json

import pytest
import torch
from vlm_fsdp.bench.hf_baseline import build_hf, hf_inputs
from vlm_fsdp.bench.report import render, write
from vlm_fsdp.bench.run import _summary
from vlm_fsdp.cli.main import main
from vlm_fsdp.config import load_config
from vlm_fsdp.data.loader import build_loader


def test_transformers_baseline_trains_on_our_batches_with_the_same_loss_tokens():
    config = load_config("tiny", overrides=["data.num_workers=0"])
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
    results = {"images": {"vlm-fsdp": {**figures, "tokens_per_s": 5000.0}, "transformers": figures}}
    table = render(results)
    assert "speed-up" in table and "5.00x" in table
    record, chart = write(results, {"recipe": "tiny", "device": "test"}, tmp_path)
    assert json.loads(record.read_text())["results"] == results
    assert chart.read_bytes().startswith(b"\x89PNG")


def test_a_system_that_ran_out_of_memory_is_reported_without_a_ratio(tmp_path):
    results = {"text": {"vlm-fsdp": {"error": "out of GPU memory: tried to allocate"}, "transformers": {}}}
    results["text"]["transformers"] = {key: 1.0 for key in ("tokens_per_s", "tflops_per_gpu", "mfu")} | {
        key: 0.5
        for key in ("peak_memory_gib", "step_time_s", "data_wait_s", "vision_forward_s", "optimizer_s", "rest_s")
    }
    table = render(results)
    assert "vlm-fsdp      out of GPU memory" in table and "speed-up" not in table
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
