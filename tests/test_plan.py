"""`vlm-fsdp plan`: counts, FLOPs, memory under sharding strategies, layout checks, JSON output."""

from __future__ import annotations

import json
import time

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
            "qwen3_vl_30b_a3b",
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
    # a text-only run trains no part of the vision tower
    text = load_config("qwen3_vl_30b_a3b_proxy", overrides=["data.text_only=true"])
    untrained = load_config(
        "qwen3_vl_30b_a3b_proxy", overrides=["model.freeze_vision_model=true", "model.freeze_vision_projection=true"]
    )
    assert estimate_memory(text, 1, 0.0).optimizer == estimate_memory(untrained, 1, 0.0).optimizer


def test_without_fp32_main_weights_the_optimizer_keeps_a_third_of_its_state():
    """fp32 main weights and moments (12 bytes per trained parameter) against bf16 moments alone (4)."""
    fp32 = estimate_memory(load_config("qwen3_vl_30b_a3b_proxy"), 1, 0.5)
    bf16 = estimate_memory(load_config("qwen3_vl_30b_a3b_proxy", overrides=["ddp.preserve_fp32_weights=false"]), 1, 0.5)
    assert bf16.optimizer * 3 == pytest.approx(fp32.optimizer, rel=1e-9)
    assert (bf16.weights, bf16.gradients, bf16.activations) == (fp32.weights, fp32.gradients, fp32.activations)


def test_flops_per_token_is_six_times_active_matmul_params_plus_attention():
    m = load_config("qwen3_vl_30b_a3b").model
    counts = count_params(m)
    # per token the forward pass multiplies by every active weight matrix of the decoder layers once (2 FLOPs per
    # weight), and a labelled token by the output layer's too
    active_matmul = counts.language_dense - m.num_layers * (2 * m.hidden_size + 2 * m.kv_channels) - m.hidden_size
    active_matmul += counts.active_experts
    assert text_token_flops(m) == 2 * active_matmul
    doc, labelled = 4096, 1000
    attention = m.num_layers * 4 * m.num_attention_heads * m.kv_channels * doc * (doc + 1) // 2
    output = 2 * m.vocab_size * m.hidden_size
    expected = 3 * (doc * 2 * active_matmul + attention + labelled * output)
    assert training_flops(m, [doc], labelled_tokens=labelled) == expected
    # packing two documents halves-ish the attention work, never the weight work
    assert training_flops(m, [2048, 2048], labelled_tokens=0) < training_flops(m, [4096], labelled_tokens=0)


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


def test_verdict_says_the_layout_is_why(capsys):
    code, plan = plan_json(capsys, "--recipe", "qwen3_vl_30b_a3b", "--gpus", "6", "model.expert_model_parallel_size=4")
    assert code == 1 and plan["fits"] is False
    assert plan["verdict"] == "invalid_layout" and plan["layout"]["problems"]
    main(["plan", "--recipe", "qwen3_vl_30b_a3b", "--gpus", "6", "model.expert_model_parallel_size=4"])
    assert "Verdict: DOES NOT FIT: the layout is invalid on 6 GPU(s)" in capsys.readouterr().out


def test_verdict_says_memory_is_why_and_suggests_a_layout_that_fits(capsys, root):
    args = ["--recipe", "qwen3_vl_30b_a3b", "--config-file", str(root / "recipes/qwen3_vl_30b_a3b_mfsdp.yaml")]
    args += ["--gpus", "8"]
    code, plan = plan_json(capsys, *args)
    assert code == 1 and plan["verdict"] == "out_of_memory" and plan["memory_fits"] is False
    suggestion = plan["suggestion"]
    assert suggestion["gpus"] == 16 and suggestion["problems"] == []
    assert suggestion["total_gib"] <= plan["memory_gib"]["usable"]
    _, there = plan_json(capsys, *args[:-1], "16")
    assert there["fits"] is True and there["suggestion"] is None
    assert main(["plan", *args]) == 1
    out = capsys.readouterr().out
    assert "Verdict: DOES NOT FIT in memory:" in out
    assert "Suggestion: the same config fits on 16 GPUs (2 expert-parallel groups of 8)" in out


def test_a_suggestion_names_what_the_layout_needs_where_memory_fits(capsys, root):
    args = ["--recipe", "qwen3_vl_235b_a22b", "--config-file", str(root / "recipes/qwen3_vl_235b_a22b_mfsdp.yaml")]
    _, plan = plan_json(capsys, *args, "--gpus", "32")
    suggestion = plan["suggestion"]
    assert suggestion["gpus"] == 128
    assert "train.global_batch_size=64 is not a multiple" in suggestion["problems"][0]
    _, larger = plan_json(capsys, *args, "--gpus", "32", "--gpu-memory", "180")
    assert larger["fits"] is True


def test_no_layout_fits_when_activations_alone_are_too_large(capsys):
    _, plan = plan_json(capsys, "model.seq_length=8192", "train.micro_batch_size=8", "--gpu-memory", "1")
    assert plan["verdict"] == "out_of_memory"
    assert plan["suggestion"]["gpus"] is None
    main(["plan", "model.seq_length=8192", "train.micro_batch_size=8", "--gpu-memory", "1"])
    assert "Suggestion: no layout of up to 65,536 GPUs fits" in capsys.readouterr().out


def test_json_keeps_its_keys(capsys):
    _, plan = plan_json(capsys)
    assert {"recipe", "gpus", "parameters", "flops", "layout", "memory_gib", "fits"} <= set(plan)
    assert {"memory_fits", "verdict", "suggestion"} <= set(plan)
    assert plan["verdict"] == "fits" and plan["suggestion"] is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpus", "0"], "--gpus must be between 1 and 1,048,576, got 0"),
        (["--gpus", "10000000000"], "--gpus must be between 1 and 1,048,576"),
        (["--gpu-memory", "nan"], "--gpu-memory must be a positive number of GiB"),
        (["--gpu-memory", "inf"], "--gpu-memory must be a positive number of GiB"),
        (["--gpu-memory", "-80"], "--gpu-memory must be a positive number of GiB"),
    ],
)
def test_bad_command_line_numbers_are_refused(capsys, args, message):
    assert main(["plan", *args]) == 2
    assert message in capsys.readouterr().err


def test_the_largest_accepted_model_plans_quickly(capsys):
    extreme = [
        "--recipe",
        "qwen3_vl_235b_a22b",
        "model.vision.depth=1024",
        "model.vision.deepstack_visual_indexes=[" + ", ".join(map(str, range(1000))) + "]",
        "model.num_layers=100000",
        "model.seq_length=16777216",
        "model.max_position_embeddings=16777216",
        "model.vocab_size=16777216",
        "model.hidden_size=1048576",
        "model.num_moe_experts=65536",
        "model.moe_router_topk=65536",
        "model.vision.hidden_size=1048576",
        "model.vision.intermediate_size=1048576",
        "train.micro_batch_size=16777216",
        "train.global_batch_size=16777216",
    ]
    start = time.monotonic()
    code, plan = plan_json(capsys, *extreme)
    assert time.monotonic() - start < 2  # well under a second on a fast machine; 2 CPU cores are shared here
    assert code == 1 and plan["verdict"] == "out_of_memory"


def test_sharded_weights_need_buffers_for_the_largest_unit_the_whole_vision_tower():
    config = load_config(
        "qwen3_vl_30b_a3b",
        overrides=["ddp.data_parallel_sharding_strategy=optim_grads_params", "model.expert_model_parallel_size=8"],
    )
    vision = count_params(config.model).vision
    assert vision > config.model.vocab_size * config.model.hidden_size  # the embedding; a layer is smaller at EP 8
    assert estimate_memory(config, 8, 0.5).fsdp_buffers == 2 * vision * (2 + 2)  # bf16 weights and gradients
