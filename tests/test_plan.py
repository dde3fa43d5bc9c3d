"""`vlm-fsdp plan`: counts, FLOPs, memory under sharding strategies, layout checks, JSON output."""

from __future__ import annotations

import json

import pytest
from vlm_fsdp.cli.main import main
from vlm_fsdp.config import load_config
from vlm_fsdp.plan.flops import text_token_flops, training_flops
from vlm_fsdp.plan.memory import estimate_memory
from vlm_fsdp.plan.params import count_params


def plan_json(capsys, *args: str) -> tuple[int, dict]:
    code = main(["plan", "--json", *args])
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    ("recipe", "total"), [("qwen3_vl_30b_a3b", 31_070_754_032), ("qwen3_vl_235b_a22b", 235_670_022_896)]
)
def test_plan_json_gives_exact_integer_parameter_counts(capsys, recipe, total):
    _, plan = plan_json(
        capsys,
        "--recipe",
        recipe,
        "--gpus",
        "64",
        "model.expert_model_parallel_size=8",
        "train.global_batch_size=64",
    )
    params = plan["parameters"]
    assert params["total"] == total
    assert all(isinstance(v, int) for v in params.values())
    assert params["vision"] + params["language_dense"] + params["experts"] + params["embeddings"] == total
    assert params["active"] == total - params["experts"] + params["active_experts"]


def test_sharding_strategies_order_memory():
    totals = {}
    for strategy in ("no_shard", "optim_grads", "optim_grads_params"):
        meta = "false" if strategy == "no_shard" else "true"
        config = load_config(
            "qwen3_vl_30b_a3b_proxy",
            overrides=[f"ddp.data_parallel_sharding_strategy={strategy}", f"model.init_model_with_meta_device={meta}"],
        )
        totals[strategy] = estimate_memory(config, 8, 0.5)
    assert totals["optim_grads"].optimizer < totals["no_shard"].optimizer
    assert totals["optim_grads"].gradients < totals["no_shard"].gradients
    assert totals["optim_grads_params"].weights < totals["optim_grads"].weights
    assert totals["no_shard"].total > totals["optim_grads"].total > totals["optim_grads_params"].total


def test_recompute_and_freezing_reduce_memory():
    base = load_config("qwen3_vl_30b_a3b_proxy")
    full = load_config(
        "qwen3_vl_30b_a3b_proxy",
        overrides=[
            "model.recompute_granularity=full",
            "model.recompute_method=uniform",
            "model.recompute_num_layers=1",
        ],
    )
    frozen = load_config("qwen3_vl_30b_a3b_proxy", overrides=["model.freeze_vision_model=true"])
    assert estimate_memory(full, 1, 0.5).activations < estimate_memory(base, 1, 0.5).activations
    assert estimate_memory(frozen, 1, 0.5).optimizer < estimate_memory(base, 1, 0.5).optimizer


def test_flops_per_token_is_six_times_active_matmul_params_plus_attention():
    m = load_config("qwen3_vl_30b_a3b").model
    counts = count_params(m)
    # per token the forward pass multiplies by every active weight matrix once (2 FLOPs per weight)
    active_matmul = counts.language_dense - m.num_layers * (2 * m.hidden_size + 2 * m.kv_channels) - m.hidden_size
    active_matmul += counts.active_experts + m.vocab_size * m.hidden_size
    assert text_token_flops(m) == 2 * active_matmul
    doc = 4096
    attention = m.num_layers * 4 * m.num_attention_heads * m.kv_channels * doc * (doc + 1) // 2
    assert training_flops(m, [doc]) == 3 * (doc * 2 * active_matmul + attention)
    # packing two documents halves-ish the attention work, never the weight work
    assert training_flops(m, [2048, 2048]) < training_flops(m, [4096])


def test_invalid_layout_is_rejected_with_reasons(capsys):
    code = main(["plan", "--recipe", "qwen3_vl_30b_a3b", "--gpus", "6", "model.expert_model_parallel_size=4"])
    out = capsys.readouterr().out
    assert code == 1
    assert "Invalid layout" in out
    assert "6 GPUs cannot be split into expert-parallel groups of 4" in out
    assert "DOES NOT FIT" in out


def test_text_plan_renders_and_fits_tiny(capsys):
    assert main(["plan"]) == 0
    out = capsys.readouterr().out
    assert "Plan for recipe 'tiny' on 1 GPU(s)" in out
    assert "Verdict: FITS" in out


def test_huge_model_does_not_fit_one_gpu(capsys):
    code, plan = plan_json(capsys, "--recipe", "qwen3_vl_235b_a22b", "train.global_batch_size=1")
    assert code == 1 and plan["fits"] is False and plan["layout"]["problems"] == []
    assert plan["memory_gib"]["total"] > 1000
