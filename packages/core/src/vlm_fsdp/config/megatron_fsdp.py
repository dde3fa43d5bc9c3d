"""The one flag: `dist.use_megatron_fsdp` decides the default of every field left null.

| field                                   | with Megatron-FSDP   | without            |
|-----------------------------------------|----------------------|--------------------|
| ddp.use_distributed_optimizer           | true                 | false              |
| ddp.data_parallel_sharding_strategy     | optim_grads_params   | no_shard           |
| ddp.overlap_grad_reduce                 | true                 | false              |
| ddp.overlap_param_gather                | true                 | false              |
| checkpoint.ckpt_format                  | fsdp_dtensor         | torch_dist         |
| model.gradient_accumulation_fusion      | false                | false              |
| model.calculate_per_token_loss          | true                 | false              |
| model.init_model_with_meta_device       | true                 | false              |

A value set by a recipe, a config file or the command line is never changed; `validate` then rejects
combinations that cannot work.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vlm_fsdp.config.run import Config

# (section, field) -> (value with Megatron-FSDP, value without)
DEFAULTS: dict[tuple[str, str], tuple[Any, Any]] = {
    ("ddp", "use_distributed_optimizer"): (True, False),
    ("ddp", "data_parallel_sharding_strategy"): ("optim_grads_params", "no_shard"),
    ("ddp", "overlap_grad_reduce"): (True, False),
    ("ddp", "overlap_param_gather"): (True, False),
    ("checkpoint", "ckpt_format"): ("fsdp_dtensor", "torch_dist"),
    ("model", "gradient_accumulation_fusion"): (False, False),
    ("model", "calculate_per_token_loss"): (True, False),
    ("model", "init_model_with_meta_device"): (True, False),
}


def resolve(config: Config) -> Config:
    """A copy of `config` with every null field of DEFAULTS filled in from `dist.use_megatron_fsdp`."""
    config = dataclasses.replace(config)
    fsdp = config.dist.use_megatron_fsdp
    for (section, name), (with_fsdp, without) in DEFAULTS.items():
        part = dataclasses.replace(getattr(config, section))
        if getattr(part, name) is None:
            setattr(part, name, with_fsdp if fsdp else without)
        setattr(config, section, part)
    return config
