"""Stop cleanly when the scheduler says so: SIGTERM / SIGINT, or a wall-clock budget.

    signal or time up (any rank) -> the current optimizer step finishes -> all ranks agree
    (one MAX all-reduce per step) -> every rank saves at that iteration -> exit EXIT_PREEMPTED

The handler only records the signal, so a step or a save is never cut in half by Python; a
second signal during the save is recorded and ignored (the save completes, `latest` moves
last). SIGKILL cannot be caught: that case is the save's atomicity (checkpoint/manager.py).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist

# sysexits.h EX_TEMPFAIL: "not finished, try again" -- a checkpoint at the stop iteration is
# saved; rerun with --load (the same directory as --save) to continue.
EXIT_PREEMPTED = 75
_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_REASONS = {0: None, 1: "signal", 2: "time"}


class Preemption:
    def __init__(self, exit_duration_in_mins: Optional[float] = None, start_time: Optional[float] = None):
        self.start = time.time() if start_time is None else start_time
        self.budget_s = None if exit_duration_in_mins is None else 60.0 * exit_duration_in_mins
        self.received: Optional[int] = None
        self.received_at: Optional[float] = None  # time.monotonic() of the first signal
        self._previous = {}

    def install(self) -> "Preemption":
        for sig in _SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received, self.received_at = signum, time.monotonic()
            print(f"[rank {dist.get_rank() if dist.is_initialized() else 0}] received {name}: finishing "
                  "this step, then saving and exiting", file=sys.stderr, flush=True)
        else:
            print(f"received {name} again: ignored, the checkpoint is being written", file=sys.stderr, flush=True)

    def should_stop(self, iteration: int) -> Optional[str]:
        """Collective (every rank, once per step): "signal", "time" or None, the same on all ranks."""
        from mesh_megatron.checkpoint.manager import fault

        fault("sigterm_after_step", iteration)
        timed_out = self.budget_s is not None and time.time() - self.start >= self.budget_s
        local = 1 if self.received is not None else 2 if timed_out else 0
        # NCCL reduces device tensors only; gloo host tensors.
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([local], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return _REASONS[int(flag.item())]

    @staticmethod
    def describe(reason: str) -> str:
        return ("stopped by a signal (SIGTERM/SIGINT)" if reason == "signal"
                else "stopped: --exit-duration-in-mins reached")


def process_start_time() -> float:
    """When this process started (wall clock), for --exit-duration-in-mins: the budget counts
    imports and setup, as a scheduler's time limit does."""
    try:
        with open(f"/proc/{os.getpid()}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()
