"""Stop cleanly when the scheduler says so: SIGTERM / SIGINT, or a wall-clock budget.

    signal or time up (any rank) -> the current optimizer step finishes -> all ranks agree
    (one MAX all-reduce per step) -> every rank saves at that iteration -> exit EXIT_PREEMPTED

A step too long for --preempt-grace-seconds is instead cut at a micro-batch boundary after a
signal and discarded (training/grace.py; the MAX all-reduce also agrees the measured step and
save times that plan it). The handler only records the signal, so a micro-batch or a save is
never cut in half by Python; a second signal during the save is recorded and ignored (the save
completes, `latest` moves last). SIGKILL cannot be caught: that case is the save's atomicity
(checkpoint/manager.py).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from mesh_megatron.training.grace import GracePlan

# sysexits.h EX_TEMPFAIL: "not finished, try again" -- a checkpoint at the stop iteration is
# saved; rerun with --load (the same directory as --save) to continue.
EXIT_PREEMPTED = 75
_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_REASONS = {0: None, 1: "signal", 2: "time"}


class Preemption:
    def __init__(self, exit_duration_in_mins: Optional[float] = None, start_time: Optional[float] = None,
                 grace_s: float = 30.0):
        self.start = time.time() if start_time is None else start_time
        self.budget_s = None if exit_duration_in_mins is None else 60.0 * exit_duration_in_mins
        self.plan = GracePlan(grace_s)
        self.received: Optional[int] = None
        self.received_at: Optional[float] = None  # time.monotonic() of the first signal
        self.cut_at = None  # (step, micro-batches done, of, seconds since the signal) of a cut step
        self.first_signal_at: Optional[float] = None  # time.monotonic() of the earliest signal on any rank
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
                  "this step (or dropping it at a micro-batch boundary if it would not fit in "
                  "--preempt-grace-seconds), then saving and exiting", file=sys.stderr, flush=True)
        else:
            print(f"received {name} again: ignored, the checkpoint is being written", file=sys.stderr, flush=True)

    def should_stop(self, iteration: int, step_s: float = 0.0, save_s: Optional[float] = None) -> Optional[str]:
        """Collective (every rank, once per step): "signal", "time" or None, the same on all ranks.
        Also agrees the slowest rank's last step and save times (0: none) for the plan."""
        from mesh_megatron.checkpoint.manager import fault

        fault("sigterm_after_step", iteration)
        timed_out = self.budget_s is not None and time.time() - self.start >= self.budget_s
        local = 1 if self.received is not None else 2 if timed_out else 0
        flag, step_s, save_s, age = _max_over_ranks([local, step_s, save_s or 0.0, self._signal_age()])
        self._agreed(age)
        self.plan.observe(step_s, save_s)
        return _REASONS[int(flag)]

    def _signal_age(self) -> float:
        """Seconds since this rank's signal, -1 without one. The caller MAX-reduces it: the
        earliest signal of any rank, remembered in `first_signal_at` (this rank's clock)."""
        return time.monotonic() - self.received_at if self.received_at is not None else -1.0

    def _agreed(self, age: float) -> float:
        if age >= 0 and self.first_signal_at is None:
            self.first_signal_at = time.monotonic() - age
        return age

    def boundary_check(self, iteration: int, accum: int) -> Optional[Callable[[int], bool]]:
        """For the step after `iteration` (of `accum` micro-batches, not pipelined): None when it
        is not checked, else a callable the step calls after each micro-batch but the last with
        how many are done; True: cut the step there (every rank returns the same)."""
        from mesh_megatron.checkpoint.manager import FAULT_ENV, fault, fault_seconds

        if self.plan.interval(accum) is None and not os.environ.get(FAULT_ENV):
            return None
        slow = fault_seconds("slow_micro_batch")

        def check(done: int) -> bool:
            time.sleep(slow)  # test hooks: a long step, SIGTERM at micro-batch DONE
            fault("sigterm_in_step", f"{iteration + 1}.{done}")
            fault("sigterm_launcher_in_step", f"{iteration + 1}.{done}")
            if not self.plan.checks_at(done, accum):
                return False
            age = self._agreed(_max_over_ranks([self._signal_age()])[0])  # the earliest signal of any rank
            if self.plan.cut(age, done, accum):
                self.cut_at = (iteration + 1, done, accum, age)
                return True
            return False

        return check

    def describe_cut(self) -> str:
        step, done, accum, age = self.cut_at
        p = self.plan
        return (f"stopped by a signal (SIGTERM/SIGINT) {age:.1f} s ago during step {step}, after micro-batch "
                f"{done} of {accum}: the rest of the step (~{p.rest_s(done, accum) - p.save_s:.1f} s) and a save "
                f"(~{p.save_s:.1f} s) would not fit in --preempt-grace-seconds {p.grace_s:g}; the partial step is "
                f"discarded, saving iteration {step - 1}")

    @staticmethod
    def describe(reason: str) -> str:
        return ("stopped by a signal (SIGTERM/SIGINT)" if reason == "signal"
                else "stopped: --exit-duration-in-mins reached")


def _max_over_ranks(values: list[float]) -> list[float]:
    # NCCL reduces device tensors only; gloo host tensors.
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


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
