"""What a checkpoint says about itself: its run record (`run.yaml`) and the model architecture in it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from vlm_fsdp.checkpoint.layout import RUN_RECORD
from vlm_fsdp.config.model import ModelConfig
from vlm_fsdp.config.overrides import apply_mapping
from vlm_fsdp.config.run import Config
from vlm_fsdp.data.tokenizer import resolve_tokenizer_path
from vlm_fsdp.errors import ConfigError, UserError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
)


def read_record(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / RUN_RECORD
    if not path.is_file():
        raise UserError(
            f"{checkpoint} has no {RUN_RECORD}, so its model architecture is unknown: it was not "
            "written by vlm-fsdp (pass --recipe to name the architecture)"
        )
    try:
        record = yaml.safe_load(path.read_bytes()) or {}
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise UserError(f"{path} is damaged: it is not readable YAML ({str(err)[:200]})") from None
    if not isinstance(record, dict):
        raise UserError(f"{path} is damaged: it holds a {type(record).__name__}, not a mapping of settings")
    return record


def model_config(record: dict[str, Any]) -> ModelConfig:
    config = Config()
    apply_mapping(config, {"model": record.get("model", {})})
    return config.model


def tokenizer_source(record: dict[str, Any]) -> Path | None:
    """The directory whose tokenizer and processor files belong with this checkpoint, if it still exists: the
    Hugging Face directory a conversion came from, or the tokenizer a training run used."""
    data, model, source = (
        record.get(k) if isinstance(record.get(k), dict) else {} for k in ("data", "model", "source")
    )
    if "data" in record:
        try:
            tokenizer = resolve_tokenizer_path(data.get("tokenizer"), model.get("hf_path"))
        except (ConfigError, TypeError, ValueError, OSError):  # the tokenizer directory has moved since training
            return None
        return tokenizer.parent
    hf_path = source.get("hf_path")
    try:
        return Path(hf_path) if isinstance(hf_path, str) and Path(hf_path).is_dir() else None
    except (ValueError, OSError):  # not a usable path
        return None
