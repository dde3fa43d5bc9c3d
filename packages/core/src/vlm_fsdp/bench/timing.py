"""Step-time breakdown with CUDA events: vision-tower forward (hooked), forward + backward, optimizer step."""

from __future__ import annotations

import torch


class VisionTimer:
    """Accumulates the GPU time of every forward pass of a module between `start` and `read`."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        module.register_forward_pre_hook(self._begin)
        module.register_forward_hook(self._end)

    def _begin(self, module, args) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.pairs.append((event, event))

    def _end(self, module, args, output) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.pairs[-1] = (self.pairs[-1][0], event)

    def read(self) -> float:
        """Seconds spent in the module's forward since the last read (synchronises)."""
        torch.cuda.synchronize()
        seconds = sum(start.elapsed_time(end) for start, end in self.pairs) / 1000
        self.pairs.clear()
        return seconds
