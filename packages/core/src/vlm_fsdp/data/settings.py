"""A run's data settings, resolved and checked once from its config (and a Hugging Face model directory)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from vlm_fsdp.config.run import Config
from vlm_fsdp.data.bundled import bundled_dataset
from vlm_fsdp.data.images import QWEN3_VL_MAX_PIXELS, QWEN3_VL_MIN_PIXELS, ImageSettings
from vlm_fsdp.data.tokenizer import SpecialIds, check_against_model, load_tokenizer, resolve_tokenizer_path, special_ids
from vlm_fsdp.data.vision_inputs import position_grid_side
from vlm_fsdp.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class DataSettings:
    """Everything the loader and its workers need; plain values, so it pickles into worker processes."""

    dataset: Path
    """Prepared Energon dataset directory."""
    drop_image_samples: bool
    """Keep only samples without images (data.text_only on a dataset of data.path)."""
    tokenizer: Path
    special: SpecialIds
    images: ImageSettings
    seq_length: int
    micro_batch_size: int
    max_patches_per_sequence: int | None
    packing_window: int
    seed: int
    strict: bool
    num_workers: int
    prefetch_factor: int
    timeout_seconds: float


def resolve(config: Config) -> DataSettings:
    """The data settings of a run, or a ConfigError that says which setting is wrong and how to fix it."""
    data, model = config.data, config.model
    for name, low in (("num_workers", 0), ("prefetch_factor", 1), ("packing_window", 1)):
        if getattr(data, name) is not None and getattr(data, name) < low:
            raise ConfigError(f"data.{name} must be at least {low}, got {getattr(data, name)}")
    if data.timeout_seconds <= 0:
        raise ConfigError(f"data.timeout_seconds must be positive, got {data.timeout_seconds}")

    tokenizer_path = resolve_tokenizer_path(data.tokenizer, model.hf_path)
    tokenizer = load_tokenizer(tokenizer_path)
    check_against_model(tokenizer, tokenizer_path, model)
    images = image_settings(config, processor_config(tokenizer_path))

    budget = data.max_patches_per_microbatch
    if budget is not None and budget < config.train.micro_batch_size:
        raise ConfigError(
            f"data.max_patches_per_microbatch={budget} is below train.micro_batch_size: every packed sequence gets "
            "an equal share of the budget; raise it (or set null for no budget beyond model.seq_length)"
        )
    if data.path is None:
        dataset = bundled_dataset(text_only=data.text_only)
    else:
        dataset = Path(data.path).expanduser()
        if not dataset.is_dir():
            raise ConfigError(
                f"data.path={data.path} is not a directory; make a dataset with `vlm-fsdp data prepare "
                "INPUT.jsonl OUTPUT_DIR` and set data.path to OUTPUT_DIR (or null for the bundled data)"
            )
    return DataSettings(
        dataset=dataset,
        drop_image_samples=data.text_only and data.path is not None,
        tokenizer=tokenizer_path,
        special=special_ids(tokenizer, tokenizer_path),
        images=images,
        seq_length=model.seq_length,
        micro_batch_size=config.train.micro_batch_size,
        max_patches_per_sequence=None if budget is None else budget // config.train.micro_batch_size,
        packing_window=data.packing_window,
        seed=config.train.seed,
        strict=data.strict,
        num_workers=default_workers() if data.num_workers is None else data.num_workers,
        prefetch_factor=data.prefetch_factor,
        timeout_seconds=data.timeout_seconds,
    )


MAX_DEFAULT_WORKERS = 4
"""On one H200, with two workers a step of eight 4,096-token microbatches (2.2 s) waited 3% of its time for data;
eight workers on its 16 cores made one-microbatch steps slower."""


def default_workers() -> int:
    """Data workers for `data.num_workers: null`: one per CPU core of this rank's share of the node (the ranks a
    launcher started on it share its cores), less one for the rank itself; at least 1, at most
    MAX_DEFAULT_WORKERS."""
    cores = len(os.sched_getaffinity(0))
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(MAX_DEFAULT_WORKERS, cores // max(ranks, 1) - 1))


def processor_config(tokenizer_path: Path) -> dict:
    """The `preprocessor_config.json` beside a Hugging Face model directory's tokenizer, or {} when there is none."""
    path = tokenizer_path.parent / "preprocessor_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from None


def image_settings(config: Config, processor: dict) -> ImageSettings:
    """Image settings from the model's vision config, the processor config and data.* (which win)."""
    vision, data = config.model.vision, config.data
    ours = {
        "patch_size": vision.patch_size,
        "temporal_patch_size": vision.temporal_patch_size,
        "merge_size": vision.spatial_merge_size,
    }
    for key, value in ours.items():
        if key in processor and processor[key] != value:
            raise ConfigError(
                f"the model directory's preprocessor_config.json has {key}={processor[key]}, but the model config "
                f"has {value} (model.vision.{'spatial_merge_size' if key == 'merge_size' else key}): they must agree"
            )
    size = processor.get("size") or {}
    min_pixels = data.min_pixels or processor.get("min_pixels") or size.get("shortest_edge") or QWEN3_VL_MIN_PIXELS
    max_pixels = data.max_pixels or processor.get("max_pixels") or size.get("longest_edge") or QWEN3_VL_MAX_PIXELS
    if not 0 < min_pixels <= max_pixels:
        raise ConfigError(
            f"image pixel limits need 0 < min_pixels <= max_pixels, got {min_pixels} and {max_pixels}: set "
            "data.min_pixels and data.max_pixels (null takes them from the model directory or Qwen3-VL's defaults)"
        )
    factor = vision.patch_size * vision.spatial_merge_size
    buckets = []
    for bucket in data.image_buckets:
        if len(bucket) != 2 or any(side < factor or side % factor for side in bucket):
            raise ConfigError(
                f"data.image_buckets entry {bucket} must be [height, width] with both sides positive multiples of "
                f"{factor} (model.vision.patch_size x spatial_merge_size), e.g. [640, 640]"
            )
        buckets.append((bucket[0], bucket[1]))
    return ImageSettings(
        **ours,
        mean=tuple(processor.get("image_mean", (0.5, 0.5, 0.5))),
        std=tuple(processor.get("image_std", (0.5, 0.5, 0.5))),
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        buckets=tuple(buckets),
        position_grid_side=position_grid_side(vision),
    )
