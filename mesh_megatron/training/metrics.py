"""Throughput, loop-aware FLOPs, MFU and memory for the training log."""

from __future__ import annotations

import contextlib
import re
import resource
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

@dataclass(frozen=True)
class Card:
    """A GPU's dense peak FLOP/s (the datasheet's figures without sparsity)."""

    name: str  # the card assumed, as the log names it
    pattern: str  # regex searched in torch.cuda.get_device_name()
    bf16: float  # tensor cores, bf16 (fp16 the same)
    tf32: float  # tensor cores, tf32 (fp32 matmuls with torch.backends.cuda.matmul.allow_tf32)
    fp32: float  # CUDA cores


# First match wins: the specific forms (NVL, PCIe, GH200) before the plain name. The names
# torch reports: "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA H100 NVL",
# "NVIDIA H200", "NVIDIA GH200 480GB", "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe".
CARDS = (
    Card("H100 NVL", r"H100.*NVL", 835e12, 418e12, 60e12),
    Card("H100 PCIe", r"H100.*PCIe", 756e12, 378e12, 51e12),
    Card("GH200", r"GH200", 989e12, 494e12, 67e12),
    Card("H200 NVL", r"H200.*NVL", 835e12, 418e12, 60e12),
    Card("H100 SXM", r"H100", 989e12, 494e12, 67e12),
    Card("H200 SXM", r"H200", 989e12, 494e12, 67e12),
    Card("A100", r"A100", 312e12, 156e12, 19.5e12),  # SXM and PCIe alike
    Card("L40S", r"L40S", 362e12, 183e12, 91.6e12),
    Card("A10", r"\bA10\b", 125e12, 62.5e12, 31.2e12),
)
PEAK_BF16_FLOPS = {c.name: c.bf16 for c in CARDS}


@dataclass(frozen=True)
class Peak:
    card: Card
    kind: str  # "bf16" | "tf32" | "fp32": which of the card's peaks MFU divides by
    flops: float

    def describe(self, device_name: str) -> str:
        return (f"MFU: of the dense {self.kind} peak of the card assumed, {self.card.name}: "
                f"{self.flops / 1e12:g} TFLOP/s per device (torch reports: {device_name})")


def find_card(device_name: str) -> Optional[Card]:
    return next((c for c in CARDS if re.search(c.pattern, device_name)), None)


def device_peak(precision: str, device_name: Optional[str] = None,
                allow_tf32: Optional[bool] = None) -> Optional[Peak]:
    """The peak this run's MFU divides by: bf16/fp16 runs the tensor-core bf16 peak; fp32 runs
    the tf32 tensor-core peak when torch lets fp32 matmuls use tf32, else the plain fp32 one.
    None on CPU or an unknown GPU (MFU is then printed as '-')."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    card = find_card(device_name)
    if card is None:
        return None
    if precision in ("bf16", "fp16"):
        return Peak(card, "bf16" if precision == "bf16" else "fp16", card.bf16)
    tf32 = torch.backends.cuda.matmul.allow_tf32 if allow_tf32 is None else allow_tf32
    return Peak(card, "tf32", card.tf32) if tf32 else Peak(card, "fp32", card.fp32)


def device_peak_flops() -> Optional[tuple[str, float]]:
    """(device name, peak bf16 FLOP/s) on a known GPU; None on CPU or an unknown device."""
    peak = device_peak("bf16")
    return (torch.cuda.get_device_name(), peak.flops) if peak else None


def peak_memory_gib() -> float:
    """Peak GPU memory allocated, or the process's peak RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@dataclass
class Throughput:
    tokens_per_s: float  # whole job
    tflops_per_device: float
    mfu: Optional[float]  # fraction of the device's peak (`peak`), GPU only

    @classmethod
    def measure(cls, tokens: int, seconds: float, flops_per_token: int, world_size: int,
                peak: Optional[Peak] = None) -> "Throughput":
        tps = tokens / max(seconds, 1e-9)
        per_device = tps * flops_per_token / world_size
        return cls(tps, per_device / 1e12, per_device / peak.flops if peak else None)


class StepWindow:
    """Time spent in training steps only, between two log lines.

    Each step (fetching its batches and the step itself) is timed; what happens between steps
    (validation, sampling, checkpoint saves, preemption checks) is not, so tokens/s and MFU
    describe training alone. The first window after start-up also holds the warm-up (memory
    allocation, kernel selection, the first collectives): `warmup` marks it.

        window = StepWindow()
        with window.step():
            train_step(...)
        seconds, steps, warmup = window.close()
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.seconds, self.steps, self.warmup = 0.0, 0, True

    @contextlib.contextmanager
    def step(self):
        start = self.clock()
        try:
            yield
        finally:
            self.seconds += self.clock() - start
            self.steps += 1

    def close(self) -> tuple[float, int, bool]:
        """(seconds, steps, warm-up) of this window; the next one starts empty and is not warm-up."""
        out = (self.seconds, self.steps, self.warmup)
        self.seconds, self.steps, self.warmup = 0.0, 0, False
        return out
