"""Batches for the training loop: a DataLoader that reads exactly what data/sampler assigns.

    StepSampler(first_step)  -> the sample indices of every micro-batch of this DP rank, step
                                after step, from `first_step` on (a resumed run's next step)
    DataLoader(workers, prefetch, pin_memory on GPU) -> (tokens, labels, mask) on the host
    to_device(...)           -> the same, on the engine's device (non_blocking from pinned memory)

The loader only moves *when* samples are read (ahead, in worker processes) never *which*:
step i's micro-batches are those of `micro_batch_indices(i, ...)`, so resume stays exact.
It also never draws from torch's global generator: every DataLoader iterator takes a base
seed for its workers from `loader.generator` (the global one when None), and a resumed run
creates its iterator *after* restoring the RNG states, so that draw would shift every
dropout mask after a resume. The loader has its own generator, seeded from the run's seed.
"""

from __future__ import annotations

import signal
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from mesh_megatron.config import TrainingConfig
from mesh_megatron.data.sampler import collate_samples, micro_batch_indices

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # tokens [m, s], labels [m, s], mask [m, s]


class StepSampler(Sampler[list[int]]):
    """Batch sampler: the micro-batches of steps first_step .. train_iters-1 for one DP rank."""

    def __init__(self, train: TrainingConfig, dp_rank: int, dp_size: int, dataset_len: int, first_step: int):
        self.train, self.dp_rank, self.dp_size = train, dp_rank, dp_size
        self.dataset_len, self.first_step = dataset_len, first_step

    def __iter__(self) -> Iterator[list[int]]:
        t = self.train
        for step in range(self.first_step, t.train_iters):
            yield from micro_batch_indices(step, t.micro_batch_size, t.global_batch_size,
                                           self.dp_rank, self.dp_size, self.dataset_len)

    def __len__(self) -> int:
        accum = self.train.global_batch_size // (self.train.micro_batch_size * self.dp_size)
        return max(0, self.train.train_iters - self.first_step) * accum


def quiet_worker_signals(worker_id: int) -> None:
    """worker_init_fn: a worker ignores SIGTERM/SIGINT. Forked after training/preemption.py's
    handler is installed, it would otherwise print its own "received SIGTERM" line; with the
    default handlers it would die of a scheduler's SIGTERM to the process group (or Ctrl-C),
    and torch's SIGCHLD check would then fail the step the training process is finishing
    before it saves. The training process decides when to stop; its DataLoader then ends
    the workers (torch's shutdown: a done event each worker polls every few seconds)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def train_loader(dataset, train: TrainingConfig, dp_rank: int, dp_size: int, first_step: int,
                 device: torch.device, num_workers: int) -> DataLoader:
    """Host-side batches of this rank from `first_step` on, read ahead by `num_workers`."""
    # Own generator (module docstring): the workers' base seed; collate draws nothing.
    generator = torch.Generator().manual_seed(train.seed + first_step)
    return DataLoader(dataset, batch_sampler=StepSampler(train, dp_rank, dp_size, len(dataset), first_step),
                      collate_fn=collate_samples, num_workers=num_workers, pin_memory=device.type == "cuda",
                      prefetch_factor=4 if num_workers else None, persistent_workers=False, generator=generator,
                      worker_init_fn=quiet_worker_signals if num_workers else None)


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Copies to the device; asynchronous from pinned host memory."""
    return tuple(t.to(device, non_blocking=True) for t in batch)
