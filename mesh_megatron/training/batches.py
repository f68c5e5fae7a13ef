"""Batches for the training loop: a DataLoader that reads exactly what data/sampler assigns.

    StepSampler(first_step)  -> the sample indices of every micro-batch of this DP rank, step
                                after step, from `first_step` on (a resumed run's next step)
    DataLoader(workers, prefetch, pin_memory on GPU) -> (tokens, labels, mask) on the host
    StepsAhead(loader, accum) -> one list of `accum` micro-batches per step, the next step's
                                read by a thread while the current step computes
    to_device(...)           -> the same, on the engine's device (non_blocking from pinned memory)

The loader only moves *when* samples are read (ahead, in worker processes) never *which*:
step i's micro-batches are those of `micro_batch_indices(i, ...)`, so resume stays exact.
It also never draws from torch's global generator: every DataLoader iterator takes a base
seed for its workers from `loader.generator` (the global one when None), and a resumed run
creates its iterator *after* restoring the RNG states, so that draw would shift every
dropout mask after a resume. The loader has its own generator, seeded from the run's seed.
"""

from __future__ import annotations

import queue
import signal
import threading
from typing import Iterator, Optional

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


class StepsAhead:
    """The loader's micro-batches grouped by optimizer step, one step read ahead.

    A thread reads step i+1's `accum` micro-batches while step i computes, whatever `accum` is
    (the DataLoader's own read-ahead covers workers x prefetch_factor batches; a step of 64
    micro-batches would otherwise wait for most of its reads). The loader's iterator is made
    here, in the caller's thread, where a run without --num-workers made it before; the
    thread only calls next() on it, in order, so which samples each step gets is unchanged
    and resume stays exact. An error while reading is raised in the caller at that step.
    Iterating ends at the last complete step; close() stops the thread early.
    """

    _END = object()

    def __init__(self, loader, accum: int, depth: int = 1):
        self._it = iter(loader)
        self.accum = accum
        self._queue: queue.Queue = queue.Queue(maxsize=depth)  # whole steps waiting to be taken
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="steps-ahead", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while not self._stop.is_set():
                step = []
                for batch in self._it:
                    step.append(batch)
                    if len(step) == self.accum:
                        break
                if len(step) < self.accum:
                    break
                self._put(step)
        except BaseException as e:  # re-raised in the training thread
            self._put(e)
        self._put(self._END)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> "StepsAhead":
        return self

    def __next__(self) -> list[Batch]:
        item = self._queue.get()
        if item is self._END:
            self._queue.put(item)  # stays exhausted
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self, timeout: Optional[float] = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
