"""The config system: precedence, errors for mistakes, the Megatron-FSDP flag, validation, saving."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from vlm_fsdp.config import Config, load_config
from vlm_fsdp.config.fields import field_docs, field_types, is_config_class
from vlm_fsdp.config.load import to_yaml
from vlm_fsdp.errors import ConfigError


def config_classes(cls: type = Config) -> list[type]:
    found = [cls]
    for tp in field_types(cls).values():
        if is_config_class(tp):
            found += config_classes(tp)
    return found


@pytest.mark.parametrize("cls", config_classes(), ids=lambda c: c.__name__)
def test_every_field_has_a_docstring_and_is_keyword_only(cls):
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
        assert f.kw_only, f"{cls.__name__}.{f.name} is not keyword-only"


def test_precedence_recipe_then_file_then_overrides(tmp_path):
    recipe = load_config("tiny")
    path = tmp_path / "over.yaml"
    path.write_text(yaml.safe_dump({"model": {"seq_length": 512, "num_layers": 2}, "train": {"train_iters": 70}}))
    config = load_config("tiny", config_file=path, overrides=["model.seq_length=256"])
    assert recipe.model.seq_length == 1024
    assert config.model.seq_length == 256  # override beats file
    assert config.model.num_layers == 2  # file beats recipe
    assert config.train.train_iters == 70
    assert config.model.hidden_size == recipe.model.hidden_size  # untouched


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.seq_lenght=8192", "model.seq_length"),
        ("ddp.use_megatron_fsdp=true", "dist.use_megatron_fsdp"),
        ("train.train_itres=3", "train.train_iters"),
        ("modle.seq_length=3", "model.seq_length"),
        ("ddp.data_parallel_sharding_stratgy=optim", "ddp.data_parallel_sharding_strategy"),
    ],
)
def test_unknown_key_names_the_closest_valid_key(override, expected):
    with pytest.raises(ConfigError, match="unknown config key") as err:
        load_config("tiny", overrides=[override])
    assert expected in str(err.value)


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("model.seq_length=abc", ["model.seq_length", "expected int", "'abc'"]),
        ("model.freeze_vision_model=yes please", ["model.freeze_vision_model", "expected bool"]),
        ("ddp.data_parallel_sharding_strategy=zero3", ["'zero3'", "'optim_grads_params'"]),
        ("model.mrope_section=[24, x, 20]", ["model.mrope_section[1]", "expected int"]),
        ("optimizer.lr=fast", ["optimizer.lr", "expected float"]),
    ],
)
def test_wrong_type_names_field_and_expected_type(override, words):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides=[override])
    for word in words:
        assert word in str(err.value)


def test_override_syntax_errors_are_clear():
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        load_config("tiny", overrides=["model.seq_length"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config("tiny", overrides=["model.seq_length.x=1"])


def test_megatron_fsdp_flag_sets_defaults_and_each_stays_overridable():
    config = load_config("tiny")
    assert config.dist.use_megatron_fsdp
    assert config.ddp.use_distributed_optimizer is True
    assert config.ddp.data_parallel_sharding_strategy == "optim_grads_params"
    assert config.ddp.overlap_grad_reduce is True and config.ddp.overlap_param_gather is True
    assert config.checkpoint.ckpt_format == "fsdp_dtensor"
    assert config.model.gradient_accumulation_fusion is False
    assert config.model.calculate_per_token_loss is True
    assert config.model.init_model_with_meta_device is True

    changed = load_config(
        "tiny",
        overrides=[
            "ddp.data_parallel_sharding_strategy=optim_grads",
            "ddp.overlap_param_gather=false",
            "model.calculate_per_token_loss=false",
            "model.init_model_with_meta_device=false",
        ],
    )
    assert changed.ddp.data_parallel_sharding_strategy == "optim_grads"
    assert changed.ddp.overlap_param_gather is False
    assert changed.ddp.overlap_grad_reduce is True
    assert changed.model.calculate_per_token_loss is False
    assert changed.model.init_model_with_meta_device is False


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (["checkpoint.ckpt_format=torch_dist"], "torch_dist cannot save Megatron-FSDP"),
        (["model.pipeline_model_parallel_size=2"], "does not support pipeline parallelism"),
        (["model.expert_model_parallel_size=3"], "does not divide model.num_moe_experts=8"),
        (["dist.use_torch_fsdp2=true"], "PyTorch FSDP2 is not supported"),
        (["dist.use_megatron_fsdp=false"], "vlm-fsdp trains with Megatron-FSDP only"),
        (["model.tensor_model_parallel_size=2"], "tensor_model_parallel_size=2 is not implemented"),
        (["model.context_parallel_size=2"], "context_parallel_size=2 is not implemented"),
        (["model.expert_tensor_parallel_size=2"], "expert_tensor_parallel_size=2 is not implemented"),
        (["ddp.data_parallel_sharding_strategy=optim"], "gives wrong gradients on more than one rank"),
        (["ddp.outer_dp_sharding_strategy=optim"], "outer_dp_sharding_strategy=optim is not implemented"),
        (
            ["ddp.num_distributed_optimizer_instances=2", "model.expert_model_parallel_size=2"],
            "builds no expert groups for hybrid sharding",
        ),
        (["model.gradient_accumulation_fusion=true"], "gradient_accumulation_fusion"),
        (["ddp.use_distributed_optimizer=false"], "use_distributed_optimizer=false is not implemented"),
        (["model.recompute_granularity=full"], "needs model.recompute_method"),
        (["model.mrope_section=[8, 8, 8]"], "must sum to model.kv_channels / 2"),
        (["model.vision.deepstack_visual_indexes=[9]"], "outside the vision tower"),
        (
            [
                "model.freeze_language_model=true",
                "model.freeze_vision_model=true",
                "model.freeze_vision_projection=true",
            ],
            "nothing would be trained",
        ),
        (["model.image_token_id=9000"], "model.image_token_id=9000 is not below model.vocab_size"),
        (["ddp.data_parallel_sharding_strategy=no_shard"], "init_model_with_meta_device=true needs a sharding"),
        (["train.train_iters=6"], "optimizer.lr_warmup_iters=20 must be below the decay length 6"),
    ],
)
def test_incompatible_combinations_are_rejected_with_the_reason(overrides, reason):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides=overrides)
    assert reason in str(err.value)


def test_layout_checks_need_the_world_size():
    load_config("qwen3_vl_30b_a3b", overrides=["model.expert_model_parallel_size=8"], world_size=8)
    with pytest.raises(ConfigError, match="cannot be split into expert-parallel groups of 8"):
        load_config("qwen3_vl_30b_a3b", overrides=["model.expert_model_parallel_size=8"], world_size=4)
    with pytest.raises(ConfigError, match="global_batch_size=32 is not a multiple"):
        load_config("qwen3_vl_30b_a3b", world_size=6)


def test_unknown_recipe_suggests_the_closest():
    with pytest.raises(ConfigError, match="Did you mean qwen3_vl_30b_a3b"):
        load_config("qwen3_vl_30b_a3")


def test_saved_yaml_loads_back_identically(tmp_path):
    config = load_config("qwen3_vl_30b_a3b_proxy", overrides=["model.seq_length=8192", "train.train_iters=20"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(config))
    again = load_config("qwen3_vl_30b_a3b_proxy", config_file=path)
    assert again == config


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("tiny", config_file=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("tiny", config_file=bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("model:\n  seq_lenght: 5\n")
    with pytest.raises(ConfigError, match=r"Did you mean model\.seq_length"):
        load_config("tiny", config_file=wrong)
