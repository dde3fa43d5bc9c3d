"""Stopping on a signal without losing steps.

SIGTERM (preemption, `scancel`), SIGUSR1 (the Slurm scripts, before the time limit) and SIGINT (Ctrl-C) ask the run
to finish the step it is in, save a checkpoint and exit 0; `--resume` then continues exactly where it stopped. The
ranks agree on stopping through the all-reduce every step already makes (`vlm_fsdp.train.loop.train_step`), so a
signal that reaches only some ranks stops all of them after the same step. A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import signal
import sys
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    """While entered, records the first stop signal this process receives (`received`) instead of dying of it."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame) -> None:
        if self.received is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signal.Signals(number)
            print(f"{self.received.name}: stopping after this step, with a checkpoint", file=sys.stderr, flush=True)
