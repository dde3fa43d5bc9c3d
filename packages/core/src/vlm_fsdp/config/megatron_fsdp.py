"""The one flag: `dist.use_megatron_fsdp` (true; vlm-fsdp trains with nothing else) decides the default of every field
left null.

| field                                   | with Megatron-FSDP   |
|-----------------------------------------|----------------------|
| ddp.use_distributed_optimizer           | true                 |
| ddp.data_parallel_sharding_strategy     | optim_grads_params   |
| ddp.overlap_grad_reduce                 | true                 |
| ddp.overlap_param_gather                | true                 |
| checkpoint.ckpt_format                  | fsdp_dtensor         |
| model.gradient_accumulation_fusion      | false                |
| model.calculate_per_token_loss          | true                 |
| model.init_model_with_meta_device       | true                 |

A value set by a recipe, a config file or the command line is never changed; `validate` then rejects
combinations that cannot work (`dist.use_megatron_fsdp=false` among them).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vlm_fsdp.config.run import Config

# (section, field) -> value with Megatron-FSDP
DEFAULTS: dict[tuple[str, str], Any] = {
    ("ddp", "use_distributed_optimizer"): True,
    ("ddp", "data_parallel_sharding_strategy"): "optim_grads_params",
    ("ddp", "overlap_grad_reduce"): True,
    ("ddp", "overlap_param_gather"): True,
    ("checkpoint", "ckpt_format"): "fsdp_dtensor",
    ("model", "gradient_accumulation_fusion"): False,
    ("model", "calculate_per_token_loss"): True,
    ("model", "init_model_with_meta_device"): True,
}


def resolve(config: Config) -> Config:
    """A copy of `config` with every null field of DEFAULTS filled in."""
    config = dataclasses.replace(config)
    for (section, name), value in DEFAULTS.items():
        part = dataclasses.replace(getattr(config, section))
        if getattr(part, name) is None:
            setattr(part, name, value)
        setattr(config, section, part)
    return config
