"""How many loop iterations a forward runs, and which of them carry gradient
(docs/MESH_METHOD.md section 6; Huginn, Geiping et al., arXiv 2502.05171).

    plan = loop_plan(recurrence, K, key, training)     # key = (iteration, micro-batch)
    for t in range(plan.iterations):
        with plan.grad(t):                             # no_grad for t < plan.no_grad
            ...

`fixed` runs the layout's K iterations, all with gradient (unless --backprop-depth k truncates
them to the last k). `poisson-lognormal` draws, per micro-batch,

    rate ~ LogNormal(log R - sigma^2 / 2, sigma = 0.5)      (E[rate] = R)
    n    ~ Poisson(rate) + 1                                (E[n] = R + 1)

and runs the first max(n - k, 0) iterations under no_grad, the last min(n, k) with gradient.
The draw is a pure function of (seed, iteration, micro-batch index): numpy's generator seeded
with that triple, never torch's global one (dropout's streams are untouched), so every TP, PP
and DP rank draws the same n for its i-th micro-batch of a step (no rank waits on another's
longer loop) and a resumed run draws what the uninterrupted one would have. Evaluation runs K.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Optional

import numpy as np
import torch

from mesh_megatron.config import RecurrenceConfig

SIGMA = 0.5  # Huginn's log-normal sigma
RecurrenceKey = tuple[int, int]  # (iteration, micro-batch index within the step)


class LoopPlan(NamedTuple):
    iterations: int  # n: loop iterations this forward runs
    no_grad: int  # the first `no_grad` of them run under torch.no_grad

    def grad(self, t: int):
        """The context iteration t runs in."""
        return torch.no_grad() if t < self.no_grad else contextlib.nullcontext()

    @property
    def with_grad(self) -> int:
        return self.iterations - self.no_grad


def draw_iterations(mean_recurrence: float, seed: int, iteration: int, micro_batch: int) -> int:
    """n ~ Poisson(LogNormal(log R - sigma^2 / 2, sigma)) + 1, a function of its arguments only."""
    rng = np.random.default_rng([seed % 2**63, iteration, micro_batch])
    rate = rng.lognormal(mean=math.log(mean_recurrence) - SIGMA ** 2 / 2, sigma=SIGMA)
    return int(rng.poisson(rate)) + 1


def loop_plan(recurrence: Optional[RecurrenceConfig], loops: int, key: Optional[RecurrenceKey],
              training: bool) -> LoopPlan:
    """The plan of one forward: K iterations with gradient in evaluation and by default."""
    if recurrence is None or not training:
        return LoopPlan(loops, 0)
    if recurrence.is_random:
        if key is None:
            raise ValueError("random recurrence in training needs the step's recurrence_key=(iteration, "
                             "micro-batch); pass it to the model's forward (training/steps.py does)")
        n = draw_iterations(recurrence.mean_recurrence, recurrence.seed, *key)
    else:
        n = loops
    k = recurrence.backprop_depth
    return LoopPlan(n, 0 if k is None else max(n - k, 0))


def expected_iterations(recurrence: Optional[RecurrenceConfig], loops: int) -> tuple[float, float]:
    """(E[n], E[min(n, k)]): iterations run forward, and with gradient, per forward.

    For poisson-lognormal E[n] = R + 1 and E[min(n, k)] = sum_{j=1..k} P(n >= j)
    = sum_{j=1..k} E_rate[P(Poisson(rate) >= j - 1)], the expectation over the log-normal rate
    by Gauss-Hermite quadrature (exact to ~1e-10 here)."""
    if recurrence is None or not recurrence.is_random:
        k = recurrence.backprop_depth if recurrence is not None else None
        return float(loops), float(loops if k is None else min(loops, k))
    mean = recurrence.mean_recurrence + 1.0
    k = recurrence.backprop_depth
    if k is None:
        return mean, mean
    x, w = np.polynomial.hermite_e.hermegauss(80)  # E[f(Z)], Z ~ N(0, 1)
    w = w / w.sum()
    rates = np.exp(math.log(recurrence.mean_recurrence) - SIGMA ** 2 / 2 + SIGMA * x)
    # P(Poisson(rate) >= m) = 1 - sum_{i<m} e^-rate rate^i / i!
    pmf = np.exp(-rates)
    below = np.zeros_like(rates)
    grad = 0.0
    for j in range(1, k + 1):  # P(n >= j) = P(Poisson >= j - 1)
        grad += float(np.sum(w * (1.0 - below)))
        below = below + pmf
        pmf = pmf * rates / j
    return mean, grad


def describe_recurrence(recurrence: RecurrenceConfig, loops: int) -> str:
    """The training log's line: what is drawn and what it costs on average."""
    n, g = expected_iterations(recurrence, loops)
    k = "all" if recurrence.backprop_depth is None else recurrence.backprop_depth
    what = (f"poisson-lognormal R={recurrence.mean_recurrence:g} (sigma {SIGMA})" if recurrence.is_random
            else f"fixed K={loops}")
    return (f"recurrence: {what}, backprop depth {k}; per forward E[iterations] {n:.3f}, "
            f"E[with gradient] {g:.3f}; evaluation runs K={loops}")
