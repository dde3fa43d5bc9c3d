"""More than one rank, on CPU processes over gloo (`tests.gloo`): the real model, Megatron-FSDP wrap, distributed
optimizer, expert-parallel all-to-all, training loop and checkpoints, on the tiny recipe in fp32 with 512-token
sequences and the bundled data, four sequences per optimizer step.

- The gradients and loss of the first step at DP 2, DP 4, EP 2 (all-to-all and all-gather dispatch), DP 2 x EP 2,
  hybrid sharding (2 x 2) and unsharded DP 2 / DP 4 equal the single-process run's (fp32: relative 1e-5; the initial
  weights are bit-identical), with the load-balancing loss on.
- A checkpoint saved at one layout resumes at another (2 -> 1, 2 -> 4, 2 -> hybrid 2 x 2, 1 -> DP 2 x EP 2,
  DP 2 x EP 2 -> 1, 1 -> EP 2) and the losses follow the uninterrupted single-process run's; on the same layout they
  are identical.
- A step where one rank has images and the other none gives the single-process gradients.
- Without the per-token loss (each microbatch's mean, averaged), EP 2's gradients equal the single-process run's.
- With the vision tower frozen (DP 2), the language gradients and the loss are the single-process run's.
- The first step's gradients with the load-balancing loss on equal transformers' for Megatron's objective.
- Hugging Face weights load into an expert-parallel run; an expert-parallel checkpoint converts to Hugging Face
  and back bitwise, and `inspect` reads it.
- With bf16 weights and no fp32 main weights (`ddp.preserve_fp32_weights=false`), a step on one rank and at EP 2 on
  two is torch's AdamW on the bf16 weights, bitwise, a run on two ranks resumes exactly, and checkpoints with and
  without fp32 main weights resume into each other.

Each world size starts its processes once per few jobs and runs them in turn (about six minutes in all on two cores).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from vlm_fsdp.cli.main import main

from tests.checkpoint_tensors import model_tensors
from tests.gloo.ranks import run_ranks

pytestmark = pytest.mark.slow

EP2 = ["model.expert_model_parallel_size=2"]
ALLGATHER = [*EP2, "model.moe_token_dispatcher_type=allgather"]
HYBRID = ["ddp.num_distributed_optimizer_instances=2"]
FROZEN = ["model.freeze_vision_model=true", "model.freeze_vision_projection=true"]
TEXT = ["data.text_only=true"]
MEAN = ["model.calculate_per_token_loss=false"]
NO_SHARD = ["ddp.data_parallel_sharding_strategy=no_shard", "model.init_model_with_meta_device=false"]
BF16_WEIGHTS = ["model.bf16=true", "ddp.preserve_fp32_weights=false"]
GRADIENT_BOUND = 1e-5  # largest difference relative to the largest reference gradient of a parameter (fp32)
NORM_BOUND = 1e-4  # fp32 norms on the CPU accumulate in single precision: they move with the sharding
LOSS_BOUND = 1e-6  # measured: within 2e-7 on every layout


def _step2(run_dir: Path) -> str:
    return str(run_dir / "checkpoints" / "iter_0000002")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ranks")


@pytest.fixture(scope="module")
def hf_model(dirs) -> Path:
    """A random Hugging Face Qwen3-VL-MoE of the tiny architecture (fp32), converted with `hf-to-fsdp`."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration
    from vlm_fsdp.config import load_config
    from vlm_fsdp.model.hf_config import hf_config_dict

    from tests.gloo.scenarios import BASE

    model = load_config("tiny", overrides=BASE).model
    torch.manual_seed(1)
    hf = Qwen3VLMoeForConditionalGeneration._from_config(Qwen3VLMoeConfig(**hf_config_dict(model)), dtype=torch.float32)
    hf.save_pretrained(dirs / "hf")
    assert main(["convert", "hf-to-fsdp", "--hf", str(dirs / "hf"), "--out", str(dirs / "hf_converted")]) == 0
    return dirs / "hf"


def _world(size: int, directory: Path, jobs: dict[str, tuple[str, dict]]) -> dict:
    """Run `jobs` (name -> (scenario, keyword arguments); `output_dir` is added) on `size` ranks."""
    ordered = [(scenario, {"output_dir": str(directory / name), **kwargs}) for name, (scenario, kwargs) in jobs.items()]
    return dict(zip(jobs, run_ranks(size, ordered, directory / "results"), strict=True)) | {"dir": directory}


@pytest.fixture(scope="module")
def one(dirs) -> dict:
    return _world(
        1,
        dirs / "w1",
        {
            "first": ("first_step", {}),
            "first_mean": ("first_step", {"overrides": MEAN}),
            "run": ("run", {}),
            "mixed": ("mixed_images", {}),
            "parity": ("transformers_parity", {}),
            "preempted": ("preempted_run", {}),
            "bookkeeping": ("bookkeeping_against_megatron", {}),
            "resident": ("resident_weights_against_megatron", {}),
            "bf16_weights": ("bf16_weights_against_torch_adamw", {}),
        },
    )


@pytest.fixture(scope="module")
def two(dirs, one, hf_model) -> dict:
    d = dirs / "w2"
    return _world(
        2,
        d,
        {
            "dp2": ("first_step", {}),
            "ep2": ("first_step", {"overrides": EP2}),
            "ep2_mean": ("first_step", {"overrides": EP2 + MEAN}),
            "ep2_allgather": ("first_step", {"overrides": ALLGATHER}),
            "no_shard": ("first_step", {"overrides": NO_SHARD}),
            "frozen": ("first_step", {"overrides": FROZEN}),
            "run_text": ("run", {"overrides": TEXT}),
            "resumed_text": ("run", {"overrides": TEXT, "resume_from": _step2(d / "run_text")}),
            "run_dp2": ("run", {}),
            "resumed_dp2": ("run", {"resume_from": _step2(d / "run_dp2")}),
            "run_ep2": ("run", {"overrides": EP2}),
            "one_to_ep2": ("run", {"overrides": EP2, "resume_from": _step2(one["dir"] / "run")}),
            "mixed": ("mixed_images", {}),
            "hf_into_ep2": ("load_weights", {"overrides": EP2, "checkpoint": str(hf_model.parent / "hf_converted")}),
            "poisoned": ("poisoned_step", {"overrides": EP2}),
            "bookkeeping_ep2": ("bookkeeping_against_megatron", {"overrides": EP2}),
            "resident_dp2": ("resident_weights_against_megatron", {"steps": 0}),
            "bf16_weights_ep2": ("bf16_weights_against_torch_adamw", {"overrides": EP2}),
            "run_bf16": ("run", {"overrides": BF16_WEIGHTS}),
            "resumed_bf16": ("run", {"overrides": BF16_WEIGHTS, "resume_from": _step2(d / "run_bf16")}),
            "fp32_to_bf16": ("run", {"overrides": BF16_WEIGHTS, "resume_from": _step2(d / "run_dp2")}),
            "bf16_to_fp32": ("run", {"resume_from": _step2(d / "run_bf16")}),
        },
    )


@pytest.fixture(scope="module")
def four(dirs, one, two) -> dict:
    return _world(
        4,
        dirs / "w4",
        {
            "dp4": ("first_step", {}),
            "dp2ep2": ("first_step", {"overrides": EP2}),
            "no_shard": ("first_step", {"overrides": NO_SHARD}),
            "hybrid": ("first_step", {"overrides": HYBRID}),
            "run_dp2ep2": ("run", {"overrides": EP2}),
            "two_to_four": ("run", {"resume_from": _step2(two["dir"] / "run_dp2")}),
            "one_to_dp2ep2": ("run", {"overrides": EP2, "resume_from": _step2(one["dir"] / "run")}),
            "two_to_hybrid": ("run", {"overrides": HYBRID, "resume_from": _step2(two["dir"] / "run_dp2")}),
        },
    )


@pytest.fixture(scope="module")
def one_again(dirs, one, two, four) -> dict:
    preempted = one["dir"] / "preempted" / "checkpoints" / "iter_0000003"
    return _world(
        1,
        dirs / "w1b",
        {
            "two_to_one": ("run", {"resume_from": _step2(two["dir"] / "run_dp2")}),
            "dp2ep2_to_one": ("run", {"resume_from": _step2(four["dir"] / "run_dp2ep2")}),
            "after_preemption": ("run", {"resume_from": str(preempted)}),
        },
    )


def _assert_same_gradients(reference: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(reference)
    for name, expected in reference.items():
        error = (got[name] - expected).abs().max() / expected.abs().max().clamp(min=1e-12)
        assert error < GRADIENT_BOUND, (name, error.item())


@pytest.mark.parametrize(
    ("world", "layout"),
    [
        (2, "dp2"),
        (2, "ep2"),
        (2, "ep2_allgather"),
        (2, "no_shard"),
        (4, "dp4"),
        (4, "dp2ep2"),
        (4, "no_shard"),
        (4, "hybrid"),
    ],
)
def test_first_step_equals_the_single_process_run(one, two, four, world, layout):
    reference, got = one["first"], {2: two, 4: four}[world][layout]
    for name, tensor in reference["initial"].items():
        assert torch.equal(got["initial"][name], tensor), f"initial {name}"
    _assert_same_gradients(reference["gradients"], got["gradients"])
    assert got["loss"] == pytest.approx(reference["loss"], rel=LOSS_BOUND)
    assert got["grad_norm"] == pytest.approx(reference["grad_norm"], rel=NORM_BOUND)


def test_a_loss_averaged_per_microbatch_gives_the_single_process_gradients_under_expert_parallelism(one, two):
    """Without the per-token loss Megatron-FSDP averages the gradients over the data-parallel ranks. At EP 2 on two
    ranks the experts' gradient buffer is not distributed, and its average is taken once, of the sum over the
    step's microbatches (megatron-core 0.16.1 scales such a buffer after every microbatch, shrinking the earlier
    microbatches' share)."""
    reference, got = one["first_mean"], two["ep2_mean"]
    _assert_same_gradients(reference["gradients"], got["gradients"])
    assert got["loss"] == pytest.approx(reference["loss"], rel=LOSS_BOUND)
    per_token = one["first"]["gradients"]
    assert any(not torch.allclose(per_token[name], grad) for name, grad in reference["gradients"].items())


def test_a_frozen_vision_tower_gets_no_gradients_and_leaves_the_others_unchanged(one, two):
    """Megatron-FSDP wraps a model with frozen parameters (once it failed to), and freezing the tower changes no
    language gradient: the tower still runs forward."""
    reference, got = one["first"], two["frozen"]
    language = {name: g for name, g in reference["gradients"].items() if not name.startswith("vision.")}
    assert len(language) < len(reference["gradients"])
    _assert_same_gradients(language, got["gradients"])
    assert got["loss"] == pytest.approx(reference["loss"], rel=LOSS_BOUND)


def test_a_text_only_run_leaves_the_vision_tower_as_it_was_and_resumes_exactly(two):
    """Under data.text_only the tower is frozen: its weights stay the initial ones through the steps and the
    checkpoints, which hold no optimizer state for it, resume."""
    run, resumed = two["run_text"], two["resumed_text"]
    assert resumed["steps"] == run["steps"][2:] and resumed["losses"] == run["losses"][2:]
    step2 = model_tensors(two["dir"] / "run_text" / "checkpoints" / "iter_0000002")
    step4 = model_tensors(two["dir"] / "resumed_text" / "checkpoints" / "iter_0000004")
    vision = [name for name in step2 if name.startswith("vision.")]
    assert vision and all(torch.equal(step2[name], step4[name]) for name in vision)
    assert not torch.equal(step2["language_model.output_layer.weight"], step4["language_model.output_layer.weight"])


def test_ranks_get_comparable_image_patches(two, four):
    for patches in (two["dp2"]["patches"], four["dp4"]["patches"]):
        assert min(patches) > 0 and max(patches) / min(patches) < 1.1, patches


@pytest.mark.parametrize("case", ["dp2", "bf16"])
def test_a_run_resumed_on_its_own_layout_continues_exactly(two, case):
    full, resumed = two[f"run_{case}"], two[f"resumed_{case}"]
    assert resumed["steps"] == [3, 4]
    assert resumed["losses"] == full["losses"][2:]
    assert resumed["grad_norms"] == full["grad_norms"][2:]


@pytest.mark.parametrize(("case", "reference"), [("fp32_to_bf16", "run_dp2"), ("bf16_to_fp32", "run_bf16")])
def test_checkpoints_with_and_without_fp32_main_weights_resume_into_each_other(two, case, reference):
    """A run switched to bf16 weights (to fit memory) or back continues close to the uninterrupted run."""
    resumed = two[case]
    assert resumed["steps"] == [3, 4]
    assert resumed["losses"] == pytest.approx(two[reference]["losses"][2:], rel=1e-3)


@pytest.mark.parametrize(("world", "case"), [(1, "bf16_weights"), (2, "bf16_weights_ep2")])
def test_bf16_weights_are_updated_as_torchs_adamw_updates_them(one, two, world, case):
    """`ddp.preserve_fp32_weights=false`: no fp32 main weights, the optimizer's weights, gradients and moments are
    bf16, and the update is exactly torch's AdamW on the bf16 weights (what transformers' training does)."""
    result = (one if world == 1 else two)[case]
    assert result["dtypes"] == ["torch.bfloat16"]
    assert result["shards_compared"] > 0 and result["shards_changed"] > result["shards_compared"] // 2, result
    assert result["shards_differing"] == 0, result


def test_runs_on_every_layout_follow_the_single_process_losses(one, two, four):
    reference = one["run"]["losses"]
    assert len(reference) == 4
    for run in (two["run_dp2"], two["run_ep2"], four["run_dp2ep2"]):
        assert run["losses"] == pytest.approx(reference, rel=LOSS_BOUND)


@pytest.mark.parametrize(
    "case", ["one_to_ep2", "two_to_four", "one_to_dp2ep2", "two_to_hybrid", "two_to_one", "dp2ep2_to_one"]
)
def test_a_checkpoint_resumes_at_another_layout(one, two, four, one_again, case):
    resumed = (two | four | one_again)[case]
    assert resumed["steps"] == [3, 4]
    assert resumed["losses"] == pytest.approx(one["run"]["losses"][2:], rel=LOSS_BOUND)


def test_a_rank_without_images_takes_part_in_the_step(one, two):
    _assert_same_gradients(one["mixed"]["gradients"], two["mixed"]["gradients"])
    assert two["mixed"]["loss_sum"] == pytest.approx(one["mixed"]["loss_sum"], rel=LOSS_BOUND)


def test_load_balancing_loss_gradients_equal_transformers(one):
    differences = one["parity"]["relative_differences"]
    assert len(differences) > 50
    worst = max(differences, key=differences.get)
    assert differences[worst] < 2e-5, (worst, differences[worst])  # measured: 2.2e-6


def test_hugging_face_weights_load_into_an_expert_parallel_run(two, hf_model):
    from safetensors.torch import load_file
    from vlm_fsdp.config import load_config
    from vlm_fsdp.model.hf_mapping import mapping

    from tests.gloo.scenarios import BASE

    model = load_config("tiny", overrides=BASE).model
    hf = {}
    for file in hf_model.glob("*.safetensors"):
        hf |= load_file(file)
    weights = two["hf_into_ep2"]["weights"]
    for entry in mapping(model):
        expected = entry.to_ours([hf[n] for n in entry.hf], model)
        assert torch.equal(weights[entry.ours].reshape(expected.shape), expected), entry.ours


def test_an_expert_parallel_checkpoint_converts_to_hugging_face_and_back_bitwise(two, tmp_path, capsys):
    checkpoint = Path(_step2(two["dir"] / "run_ep2"))
    assert main(["inspect", str(checkpoint), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["step"] == 2 and report["ranks_with_rng_state"] == [0, 1] and not report["problems"]
    experts = {t["name"]: t for t in report["tensors"] if t["name"].endswith("mlp.experts.gate_up_proj")}
    assert experts and all(t["shape"][0] == 8 and t["sharding"].startswith("2 pieces") for t in experts.values())
    exported, back = tmp_path / "hf", tmp_path / "back"
    assert main(["convert", "fsdp-to-hf", "--ckpt", str(checkpoint), "--out", str(exported), "--dtype", "float32"]) == 0
    assert main(["convert", "hf-to-fsdp", "--hf", str(exported), "--out", str(back)]) == 0
    original, converted = model_tensors(checkpoint), model_tensors(back)
    assert sorted(original) == sorted(converted)
    for name, tensor in original.items():
        assert torch.equal(converted[name], tensor), name


def test_a_step_with_a_nan_on_one_rank_is_skipped_on_every_rank(two):
    """With expert parallelism, so that the NaN also travels through the all-to-all."""
    result = two["poisoned"]
    assert result["poisoned"][0] == 0 and result["poisoned"][1] >= 1
    assert result["skipped"] == [False, True, False]
    assert result["unchanged_over_the_skipped_step"] and result["changed_over_the_next_step"]
    assert math.isnan(result["losses"][1]) and math.isfinite(result["losses"][2])
    assert result["lrs"][1] == result["lrs"][0]  # the schedule did not advance over the skipped step


def test_a_signal_stops_the_run_after_its_step_with_a_checkpoint_and_resuming_continues_exactly(one, one_again):
    preempted, reference = one["preempted"], one["run"]
    assert preempted["steps"] == [1, 2, 3]
    assert preempted["stop_signals"][-1] == "SIGTERM"
    assert "iter_0000003" in preempted["checkpoints"] and "iter_0000004" not in preempted["checkpoints"]
    assert preempted["losses"] == reference["losses"][:3]
    resumed = one_again["after_preemption"]
    assert resumed["steps"] == [4] and resumed["losses"] == reference["losses"][3:]


@pytest.mark.parametrize(("world", "case"), [(1, "bookkeeping"), (2, "bookkeeping_ep2")])
def test_the_buffer_wise_bookkeeping_gives_megatron_fsdps_gradients_and_weights_bitwise(one, two, world, case):
    """One rank (undistributed buffers) and EP 2 on two ranks (sharded dense buffers, undistributed expert ones)."""
    counts = (one if world == 1 else two)[case]
    assert counts["ranks_not_in_use"] == 0
    assert counts["gradients_compared"] > 0 and counts["weights_changed"] > 0
    assert counts["gradients_differing"] == 0 and counts["weights_differing"] == 0, counts


def test_resident_buffers_train_without_megatron_fsdps_gathering_hooks_bitwise(one, two):
    """One rank: the weights and gradients are whole in their buffers, the gathering and releasing hooks are gone from
    every module (also the decoder layers that Megatron-FSDP's tables, keyed by class, lose), every gradient hook
    is the one with its buffer slice found once, and two steps give the losses, gradient norms and weights of the
    run with Megatron-FSDP's hooks. Two ranks shard the buffers: every hook stays."""
    dropped, kept = one["resident"]["dropped"], one["resident"]["kept"]
    assert dropped["hooks"] and all(name.endswith("_root_pre_backward") for name in dropped["hooks"])
    assert dropped["module_hooks"] and set(dropped["module_hooks"]) == {"_root_pre_backward"}, dropped["module_hooks"]
    assert kept["module_hooks"].count("_pre_forward_param_unshard") > 1, kept["module_hooks"]
    assert dropped["gradient_hooks"] and all("_accumulate_into" in hook for hook in dropped["gradient_hooks"])
    assert len(kept["gradient_hooks"]) == len(dropped["gradient_hooks"])
    assert not any("_accumulate_into" in hook for hook in kept["gradient_hooks"])
    assert len(kept["hooks"]) > 2 * len(dropped["hooks"]), kept["hooks"]
    assert all(norm > 0 for norm in dropped["grad_norms"]), dropped["grad_norms"]
    assert dropped["losses"] == kept["losses"] and dropped["grad_norms"] == kept["grad_norms"]
    assert dropped["weights"].keys() == kept["weights"].keys() == dropped["initial"].keys()
    for name, weight in dropped["weights"].items():
        assert torch.equal(weight, kept["weights"][name]), name
    assert sum(not torch.equal(w, dropped["initial"][n]) for n, w in dropped["weights"].items()) > 0
    sharded = two["resident_dp2"]
    assert sharded["dropped"]["hooks"] == sharded["kept"]["hooks"]
    assert sharded["dropped"]["gradient_hooks"] == sharded["kept"]["gradient_hooks"]
    assert sharded["dropped"]["module_hooks"] == sharded["kept"]["module_hooks"]
    assert any("parameter unshard" in name for name in sharded["dropped"]["hooks"])
