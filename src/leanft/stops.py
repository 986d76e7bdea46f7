"""Stopping a run on SIGINT or SIGTERM at a step boundary, with its checkpoint written, instead of mid-step."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import torch

REPEAT_S = 2.0  # a second SIGINT/SIGTERM this long after the first aborts at once (torchrun repeats one at once)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run at a step boundary, its checkpoint written; ``leanft train`` exits
    with ``exit_code`` (128 + the signal number: 130, 143)."""

    def __init__(self, signum: int, step: int, out: Path) -> None:
        self.signum, self.step, self.out, self.exit_code = signum, step, out, 128 + signum
        self.signal = signal.Signals(signum).name
        super().__init__(f"stopped by {self.signal} after step {step}, its checkpoint in {out / 'checkpoint'}: "
                         f"continue with the same options and --resume (TrainConfig resume=True)")


class StopSignals:
    """SIGINT and SIGTERM ask every process to stop at the next step boundary, where a checkpoint is written,
    instead of ending mid-step and losing the work since the last save; a second signal a moment later
    aborts at once. The handlers before are restored on exit: ``train`` is also a library function."""

    def __init__(self, accel) -> None:
        self.accel, self.signum, self.first, self.previous = accel, 0, 0.0, {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python sets handlers there only
            self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: set outside Python

    def handle(self, signum: int, frame) -> None:
        if not self.signum:
            self.signum, self.first = signum, time.monotonic()
            if self.accel.is_main_process:
                print(f"\nleanft: {signal.Signals(signum).name}: stopping after the current training step to "
                      "checkpoint it (signal again to stop at once, losing the work since the last checkpoint)",
                      file=sys.stderr, flush=True)
        elif time.monotonic() - self.first > REPEAT_S:
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} again: stopped at once; the last checkpoint, if "
                                    "any, is kept")

    def agreed(self, save_due: bool = False) -> tuple[int, bool]:
        """The signal every process stops for (0 for none), and whether the first process's ``save_due`` holds
        (its clock says a time-based checkpoint is due: each process has its own clock, and the first one's
        decides for all). Under data parallelism one tiny all-gather answers both, so that processes
        signalled at different steps all stop at the same one."""
        if self.accel.num_processes == 1:
            return self.signum, save_due
        every = self.accel.gather(torch.tensor([[self.signum, int(save_due)]], device=self.accel.device))
        return int(every[:, 0].max()), bool(every[0, 1])
