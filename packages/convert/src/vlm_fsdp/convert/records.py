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
    return yaml.safe_load(path.read_text()) or {}


def model_config(record: dict[str, Any]) -> ModelConfig:
    config = Config()
    apply_mapping(config, {"model": record.get("model", {})})
    return config.model


def tokenizer_source(record: dict[str, Any]) -> Path | None:
    """The directory whose tokenizer and processor files belong with this checkpoint, if it still exists: the
    Hugging Face directory a conversion came from, or the tokenizer a training run used."""
    if "data" in record:
        try:
            tokenizer = resolve_tokenizer_path(record["data"].get("tokenizer"), record["model"].get("hf_path"))
        except ConfigError:  # the tokenizer directory has moved since training
            return None
        return tokenizer.parent
    source = (record.get("source") or {}).get("hf_path")
    return Path(source) if source and Path(source).is_dir() else None
