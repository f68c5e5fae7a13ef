"""Throughput, loop-aware FLOPs, MFU and memory for the training log."""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Optional

import torch

# Dense bf16 peak FLOP/s per device, by substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def device_peak_flops() -> Optional[tuple[str, float]]:
    """(device name, peak bf16 FLOP/s) on a known GPU; None on CPU or an unknown device."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in name:
            return name, peak
    return None


def peak_memory_gib() -> float:
    """Peak GPU memory allocated, or the process's peak RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@dataclass
class Throughput:
    tokens_per_s: float  # whole job
    tflops_per_device: float
    mfu: Optional[float]  # fraction of the device's bf16 peak, GPU only

    @classmethod
    def measure(cls, tokens: int, seconds: float, flops_per_token: int, world_size: int) -> "Throughput":
        tps = tokens / max(seconds, 1e-9)
        per_device = tps * flops_per_token / world_size
        peak = device_peak_flops()
        return cls(tps, per_device / 1e12, per_device / peak[1] if peak else None)
