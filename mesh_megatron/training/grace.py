"""Preemption within the grace period: cut a long accumulated step at a micro-batch boundary.

After SIGTERM the scheduler SIGKILLs the job `--preempt-grace-seconds` later (DeepSpeed's and
torchrun's launchers: 30 s; Slurm: KillWait). The run normally finishes the step in flight and
saves (training/preemption.py). When a whole step plus a save would not fit in that budget
(a pythia-1.4b step at 128 micro-batches is ~45 s), the step is checked at micro-batch
boundaries instead:

    checks on      step_s + save_s > grace            (else: no check, no extra collective)
    check every    k = max(1, floor(grace / 20 / (step_s / A))) micro-batches of the step's A
    at boundary d  age = seconds since the earliest rank's signal (-1: none; MAX over ranks)
                   cut  iff  age >= 0  and  age + step_s * (A - d) / A + save_s > grace

`step_s` is the slowest rank's wall time of the last step, `save_s` of the last save (0 before
the first), both agreed by the per-step all-reduce, so every rank computes the same schedule
and the same decision from the same numbers. A cut step leaves nothing behind
(`discard_partial_step`: its accumulated gradients are dropped as DeepSpeed drops an overflowed
step, the engine's micro-step counter and the RNG states are put back), the run saves the
iteration before it and exits 75; the resumed run reads that step's batches again, so it equals
the run that was never stopped. Under pipeline parallelism megatron-core's schedule runs the
whole step in one call: the step is never cut (a warning says when it would not fit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

CHECKS_PER_GRACE = 20  # at most one check per grace / 20 seconds of micro-batches


@dataclass
class GracePlan:
    grace_s: float
    step_s: Optional[float] = None  # the slowest rank's last step (None before the first)
    save_s: float = 0.0  # the slowest rank's last save (0 before the first)

    def observe(self, step_s: float, save_s: float) -> None:
        """New agreed measurements (0: none since the last call)."""
        if step_s > 0:
            self.step_s = step_s
        if save_s > 0:
            self.save_s = save_s

    def interval(self, accum: int) -> Optional[int]:
        """Micro-batches between two checks of a step of `accum`; None: the step is not checked."""
        if self.step_s is None or accum < 2 or self.step_s + self.save_s <= self.grace_s:
            return None
        per_micro = self.step_s / accum
        return max(1, math.floor(self.grace_s / CHECKS_PER_GRACE / per_micro))

    def checks_at(self, done: int, accum: int) -> bool:
        k = self.interval(accum)
        return k is not None and 0 < done < accum and done % k == 0

    def rest_s(self, done: int, accum: int) -> float:
        """Estimated seconds to finish the step after `done` micro-batches, then save."""
        return self.step_s * (accum - done) / accum + self.save_s

    def cut(self, age_s: float, done: int, accum: int) -> bool:
        return age_s >= 0 and age_s + self.rest_s(done, accum) > self.grace_s


def discard_partial_step(engine, micro_steps: int) -> None:
    """Drop what an unfinished accumulation left in DeepSpeed, as its ZeRO optimizer drops an
    overflowed step (stage_1_and_2.py step(): zero_grad, release and forget the accumulated
    partitions), and put the engine's micro-step counter back to the step's start, so the
    next micro-batch begins a fresh accumulation and no optimizer state moved."""
    from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

    opt = engine.optimizer
    if hasattr(opt, "averaged_gradients"):  # ZeRO-1/2
        opt.zero_grad(set_to_none=True)
        opt._release_preflattened_grad_buffers()
        for buffers in (opt.averaged_gradients, opt.all_grad_tensors):
            for k in buffers:
                buffers[k] = None
        opt.micro_step_id = INITIAL_MICRO_STEP_ID
    elif hasattr(opt, "clear_hp_grads"):  # DeepSpeed's BF16_Optimizer (ZeRO-0 bf16): fp32 accumulators
        opt.clear_hp_grads()
        opt.clear_lp_grads()
    engine.zero_grad()  # every parameter's .grad (ZeRO-0 fp32: the whole accumulation)
    engine.micro_steps = micro_steps
