"""Typed run configuration: dataclasses, recipe lookup, override merging, Megatron-FSDP defaults, validation."""

from vlm_fsdp.config.load import load_config, to_yaml
from vlm_fsdp.config.model import ModelConfig, VisionConfig
from vlm_fsdp.config.run import (
    CheckpointConfig,
    Config,
    DataConfig,
    DDPConfig,
    DistConfig,
    LoggerConfig,
    OptimizerConfig,
    TrainConfig,
)

__all__ = [
    "CheckpointConfig",
    "Config",
    "DDPConfig",
    "DataConfig",
    "DistConfig",
    "LoggerConfig",
    "ModelConfig",
    "OptimizerConfig",
    "TrainConfig",
    "VisionConfig",
    "load_config",
    "to_yaml",
]
