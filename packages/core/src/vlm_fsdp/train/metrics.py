"""The step log: what one optimizer step did and how fast, to the console, TensorBoard and W&B.

Throughput counts useful tokens only (padding excluded). TFLOP/s and MFU use the FLOP formula of
`vlm_fsdp.plan.flops` on the samples and images the step actually processed (vision per real patch, attention
per packed sample), summed over all data-parallel ranks and divided by the number of GPUs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by device name; MFU is reported against it.
PEAK_BF16_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "H800": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "GB200": 2500.0,
    "B300": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
}


def peak_tflops(device: torch.device) -> float | None:
    """The bf16 peak of this GPU, or None for a device not in the table (MFU is then not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    matches = [key for key in PEAK_BF16_TFLOPS if key in name]
    return PEAK_BF16_TFLOPS[max(matches, key=len)] if matches else None


@dataclass
class StepStats:
    step: int
    loss: float
    grad_norm: float
    lr: float
    tokens_per_s: float
    tflops_per_gpu: float
    mfu: float | None
    peak_memory_gib: float
    data_wait_share: float
    step_time_s: float
    optimizer_time_s: float
    skipped_images: int
    compiled_graphs: int | None = None
    skipped: bool = False
    """The update was skipped: the loss or the gradient norm was not finite."""
    stop_signal: str | None = None
    """The signal some rank received, after which the run stops (with a checkpoint)."""

    def line(self) -> str:
        mfu = f"{self.mfu:6.1%}" if self.mfu is not None else "   n/a"
        graphs = f"  graphs {self.compiled_graphs}" if self.compiled_graphs is not None else ""
        graphs += "  SKIPPED (not finite)" if self.skipped else ""
        return (
            f"step {self.step:>6}  loss {self.loss:8.4f}  grad_norm {self.grad_norm:8.3f}  lr {self.lr:.2e}  "
            f"tokens/s {self.tokens_per_s:>10,.0f}  TFLOP/s {self.tflops_per_gpu:7.1f}  MFU {mfu}  "
            f"mem {self.peak_memory_gib:6.2f} GiB  data wait {self.data_wait_share:5.1%}  {self.step_time_s:6.3f} s"
            f"{graphs}"
        )


class StepLogger:
    """Writes step and validation figures; only the main rank writes."""

    def __init__(
        self,
        *,
        enabled: bool,
        tensorboard_dir: Path,
        wandb_project: str | None,
        wandb_name: str,
        wandb_mode: str,
        config: dict,
    ) -> None:
        self.enabled = enabled
        self.tensorboard = None
        self.wandb = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.tensorboard = SummaryWriter(log_dir=str(tensorboard_dir))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                from vlm_fsdp.errors import UserError

                raise UserError(
                    "logger.wandb_project is set but wandb is not installed: run `uv sync --extra wandb`"
                ) from None
            self.wandb = wandb.init(project=wandb_project, name=wandb_name, mode=wandb_mode, config=config)

    def step(self, stats: StepStats) -> None:
        if not self.enabled:
            return
        print(stats.line(), flush=True)
        values = {k: v for k, v in asdict(stats).items() if k != "step" and isinstance(v, int | float)}
        for key, value in values.items():
            self.tensorboard.add_scalar(f"train/{key}", value, stats.step)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in values.items()}, step=stats.step)

    def validation(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        print(f"step {step:>6}  validation loss {loss:8.4f}", flush=True)
        self.tensorboard.add_scalar("val/loss", loss, step)
        if self.wandb is not None:
            self.wandb.log({"val/loss": loss}, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
