"""The config system: precedence, errors for mistakes, the Megatron-FSDP flag, validation, saving."""

from __future__ import annotations

import dataclasses
import re
import time
import typing

import pytest
import yaml
from vlm_fsdp.config import Config, load_config
from vlm_fsdp.config.fields import Range, field_docs, field_hints, field_types, is_config_class
from vlm_fsdp.config.load import to_yaml
from vlm_fsdp.config.validate import problems
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
        (
            ["model.freeze_language_model=true", "data.text_only=true"],
            "nothing would be trained (data.text_only leaves the vision tower untrained)",
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


# --- bad input: one clear ConfigError, never a traceback, a hang or a silent acceptance ----------------------


def numeric_fields(cls: type = Config, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, annotation with bounds) of every int and float field, in lists too."""
    found = []
    for name, hint in field_hints(cls).items():
        if is_config_class(hint):
            found += numeric_fields(hint, f"{prefix}{name}.")
        elif {int, float} & set(base_types(hint)):
            found.append((f"{prefix}{name}", hint))
    return found


def base_types(tp: object) -> list[object]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Annotated:
        return base_types(args[0])
    return [t for a in args for t in base_types(a)] if args else [tp]


def declares_range(tp: object) -> bool:
    """Whether every number a field holds has bounds: `Annotated[int, Range]`, also inside lists and unions."""
    if typing.get_origin(tp) is typing.Annotated:
        base, *rules = typing.get_args(tp)
        return any(isinstance(r, Range) for r in rules) or declares_range(base)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return bool(args) and all(declares_range(a) for a in args)


@pytest.mark.parametrize(("key", "hint"), numeric_fields(), ids=[k for k, _ in numeric_fields()])
def test_every_numeric_field_declares_its_bounds(key, hint):
    assert declares_range(hint), f"{key} has no Range in its annotation"


@pytest.mark.parametrize(
    "override",
    [
        "train.micro_batch_size=0",
        "model.num_query_groups=0",
        "model.tensor_model_parallel_size=0",
        "model.pipeline_model_parallel_size=0",
        "model.context_parallel_size=0",
        "model.expert_model_parallel_size=0",
        "model.expert_tensor_parallel_size=0",
        "model.seq_length=0",
        "model.vision.num_heads=0",
        "model.vision.spatial_merge_size=0",
        "ddp.num_distributed_optimizer_instances=0",
    ],
)
def test_zero_sizes_that_used_to_divide_by_zero_are_rejected(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{re.escape(key)} must be at least 1 \(1 <= value <= [\d,]+\), got 0"):
        load_config("tiny", overrides=[override])


def test_a_huge_depth_is_rejected_at_once_with_a_short_message():
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"model\.vision\.depth must be at most 1,024") as err:
        load_config("tiny", overrides=["model.vision.depth=1000000000000000000000000000000"])
    assert time.monotonic() - start < 1
    assert len(str(err.value)) < 200


@pytest.mark.parametrize("digits", [40, 400, 5000])
def test_huge_integers_give_a_short_error(digits):
    for key in ("model.seq_length", "optimizer.lr", "train.seed"):
        with pytest.raises(ConfigError) as err:
            load_config("tiny", overrides=[f"{key}={'9' * digits}"])
        assert len(str(err.value)) < 300
        assert key in str(err.value) or "too large" in str(err.value)


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("optimizer.lr=.nan", "optimizer.lr must be a finite number, got nan"),
        ("optimizer.lr=.inf", "optimizer.lr must be a finite number, got inf"),
        ("optimizer.lr=-0.1", "optimizer.lr must be at least 0"),
        ("optimizer.min_lr=-1.0e-5", "optimizer.min_lr must be at least 0"),
        ("optimizer.lr=2", "optimizer.lr must be at most 1"),
        ("optimizer.lr=1e-4", "YAML reads a number with an exponent as a number only with a dot in it"),
        ("optimizer.min_lr=0.5", "optimizer.min_lr=0.5 is larger than optimizer.lr=0.001"),
        ("optimizer.adam_beta1=1.5", "optimizer.adam_beta1 must be less than 1 (0 <= value < 1), got 1.5"),
        ("optimizer.adam_beta2=-0.1", "optimizer.adam_beta2 must be at least 0"),
        ("optimizer.adam_beta2=.nan", "optimizer.adam_beta2 must be a finite number"),
        ("optimizer.adam_eps=0", "optimizer.adam_eps must be greater than 0"),
        ("optimizer.adam_eps=-.inf", "optimizer.adam_eps must be a finite number"),
        ("optimizer.weight_decay=-1", "optimizer.weight_decay must be at least 0"),
        ("optimizer.clip_grad=-1", "optimizer.clip_grad must be at least 0"),
        ("model.moe_aux_loss_coeff=-0.01", "model.moe_aux_loss_coeff must be at least 0"),
        ("model.norm_epsilon=0", "model.norm_epsilon must be greater than 0"),
        ("model.num_layers=-4", "model.num_layers must be at least 1"),
        ("model.hidden_size=-256", "model.hidden_size must be at least 1"),
        ("train.global_batch_size=-8", "train.global_batch_size must be at least 1"),
        ("logger.log_interval=0", "logger.log_interval must be at least 1"),
        ("checkpoint.most_recent_k=-3", "checkpoint.most_recent_k must be at least 1"),
        ("checkpoint.save_interval=0", "checkpoint.save_interval must be at least 1"),
        ("train.eval_interval=0", "train.eval_interval must be at least 1"),
        ("train.max_bad_steps=0", "train.max_bad_steps must be at least 1"),
        ("train.seed=-1", "train.seed must be at least 0"),
        ("data.timeout_seconds=0", "data.timeout_seconds must be greater than 0"),
        ("data.num_workers=-1", "data.num_workers must be at least 0"),
        ("data.image_buckets=[[600, 600]]", "not [height, width] pairs of multiples of 32"),
        ("data.image_buckets=[[0, 640]]", "data.image_buckets[0][0] must be at least 1"),
        ("data.image_buckets=[[640, 640, 640]]", "data.image_buckets[0] must have exactly 2 sides"),
        ("data.min_pixels=0", "data.min_pixels must be at least 1"),
        ("model.mrope_section=[12, 20]", "model.mrope_section must have exactly 3 sections"),
        ("model.vision.deepstack_visual_indexes=[-1]", "model.vision.deepstack_visual_indexes[0] must be at least 0"),
        ("model.moe_router_topk=9", "model.moe_router_topk=9 must be between 1 and model.num_moe_experts=8"),
    ],
)
def test_out_of_range_values_are_rejected_with_key_value_and_range(override, words):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides=[override])
    assert words in str(err.value)
    assert "\n" not in str(err.value)


def test_data_settings_that_fit_are_accepted():
    config = load_config("tiny", overrides=["data.num_workers=0", "data.image_buckets=[]", "train.seed=0"])
    assert config.data.num_workers == 0 and config.data.image_buckets == []


def test_a_recipe_with_values_out_of_range_is_rejected_like_an_override():
    config = load_config("tiny")
    config.train.micro_batch_size = 0
    config.model.seq_length = "long"
    found = problems(config)
    assert "train.micro_batch_size must be at least 1 (1 <= value <= 16,777,216), got 0" in found
    assert "model.seq_length: expected int, got 'long' (str)" in found


def test_several_problems_are_listed_on_one_line():
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides=["model.vocab_size=100"])
    message = str(err.value)
    assert message.startswith("invalid configuration, 4 problems: (1) model.image_token_id=")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("model.seq_length=!!bool 1", "YAML tags such as '!!bool' are not accepted"),
        ("model.seq_length=!!int 1", "YAML tags such as '!!int' are not accepted"),
        ("model.hf_path=!!python/object/apply:os.system [ls]", "YAML tags such as '!!python/object/apply:os.system'"),
        ("model.hf_path=!custom x", "YAML tags such as '!custom'"),
        ("train.output_dir=\x1b[31mred", "holds the control character U+001B at character 18"),
        ("train.output_dir=a\u202eb", "U+202E (right-to-left override)"),
        ("model.hf_path=a\udcffb", "U+DCFF (an undecodable byte)"),
        ("model.seq_length=[1, 2", "not valid YAML"),
        ("model.mrope_section=&a [1, *a]", "an alias refers to a value that contains it"),
        ("model.mrope_section=" + "[" * 50 + "]" * 50, "nested deeper than 10 levels"),
        ("model.hf_path=" + "x" * 20_000, "is longer than 10,000 characters"),
        ("model.mrope_section={a: 1, a: 2}", "duplicate key 'a'"),
    ],
)
def test_unsafe_override_values_are_refused(override, words):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides=[override])
    message = str(err.value)
    assert words in message
    assert "\n" not in message and "\x1b" not in message and len(message) < 400


def test_dates_stay_strings():
    config = load_config("tiny", overrides=["train.output_dir=2024-13-45"])
    assert config.train.output_dir == "2024-13-45"


ALIAS_BOMB = "\n".join(
    ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"model:\n  seq_length: 512\ntrain:\n  train_iters: 3\nmodel:\n  num_layers: 2\n", "duplicate key 'model'"),
        (b"model:\n  seq_length: 512\n  seq_length: 256\n", "(line 3, column 3)"),
        (ALIAS_BOMB.encode(), "aliases expand to more than 10,000 values"),
        (b"model:\n  mrope_section: " + b"[" * 100_000 + b"]" * 100_000, "nested deeper than 10 levels"),
        (bytes(range(256)), "is not UTF-8 text (byte 0x80 at offset 128)"),
        ("model:\n  hf_path: café\n".encode("latin-1"), "is not UTF-8 text"),
        (b"train:\n  output_dir: \x1b[31mred\n", "control character U+001B at line 2, column 15"),
        (b"model:\n  seq_length: !!bool 1\n", "YAML tags such as '!!bool' are not accepted"),
        (b"model:\n  seq_length: " + b"9" * 5000 + b"\n", "an integer of 5,000 digits is too large"),
        (b"#" * (1 << 20) + b"\n", "is larger than 1 MiB"),
        (b"- 1\n- 2\n", "must hold a mapping of sections"),
        (b"model:\n  1: 2\n", "keys are names, got 1 (int)"),
        (b"model: 5\n", "model: expected a mapping of keys (a section), got 5"),
        (b"optimizer:\n  lr: .nan\n", "optimizer.lr must be a finite number"),
    ],
)
def test_bad_config_files_are_refused_with_one_line(tmp_path, content, words):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_config("tiny", config_file=path)
    message = str(err.value)
    assert words in message
    assert "\n" not in message and len(message) < 400


def test_a_config_file_that_is_not_a_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="is not a regular file"):
        load_config("tiny", config_file=tmp_path)
    with pytest.raises(ConfigError, match="control character U\\+0000"):
        load_config("tiny", config_file="a\x00b.yaml")


def test_anchors_within_the_limits_still_work(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("model:\n  mrope_section: &three [12, 10, 10]\n  vision:\n    deepstack_visual_indexes: [1, 2]\n")
    assert load_config("tiny", config_file=path).model.mrope_section == [12, 10, 10]


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbfmodel:\n  seq_length: 512\n")
    assert load_config("tiny", config_file=path).model.seq_length == 512


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.seed=1", "Did you mean train.seed or model.seq_length"),
        ("train.num_layers=2", "Did you mean model.num_layers"),
        ("optimizer.log_interval=2", "Did you mean logger.log_interval"),
        ("data.seq_length=2", "Did you mean model.seq_length"),
    ],
)
def test_a_key_in_the_wrong_section_names_the_right_one(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides=[override])
    assert expected in str(err.value)


def test_an_unknown_key_never_suggests_the_section_it_is_in():
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides=["model.seed=1"])
    assert " model?" not in str(err.value) and " model or" not in str(err.value)


def test_a_long_unknown_key_is_cut_in_the_message():
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides=[f"model.{'x' * 5000}=1"])
    assert len(str(err.value)) < 200
