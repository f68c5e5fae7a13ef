"""The DataLoader path reads exactly the samples data/sampler assigns, from any step on."""

import pytest
import torch

from mesh_megatron.config import TrainingConfig
from mesh_megatron.data.sampler import collate, micro_batch_indices
from mesh_megatron.training.batches import StepSampler, train_loader


class Samples:
    """A stand-in GPTDataset: sample i is tokens i*10 .. i*10+s (numpy-like dict)."""

    def __init__(self, n, s=8):
        self.n, self.s = n, s

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        t = torch.arange(i * 10, i * 10 + self.s + 1)
        return {"tokens": t[:-1].numpy(), "labels": t[1:].numpy(), "loss_mask": torch.ones(self.s).numpy()}


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("first_step", [0, 3])
def test_loader_yields_the_sampler_batches(workers, first_step):
    train = TrainingConfig(micro_batch_size=2, global_batch_size=8, train_iters=6)
    data = Samples(37)  # wraps around: 6 steps x 8 samples > 37
    for dp_rank in range(2):
        loader = train_loader(data, train, dp_rank, 2, first_step, torch.device("cpu"), workers)
        got = list(loader)
        want = [collate(data, idx) for step in range(first_step, 6)
                for idx in micro_batch_indices(step, 2, 8, dp_rank, 2, len(data))]
        assert len(got) == len(want) == len(StepSampler(train, dp_rank, 2, len(data), first_step))
        for g, w in zip(got, want):
            for a, b in zip(g, w):
                assert a.dtype == b.dtype and torch.equal(a, b)


def test_workers_ignore_the_preemption_signals(capfd):
    """A worker forked after the preemption handler is installed neither prints its own
    "received SIGTERM" line nor dies of a SIGTERM/SIGINT sent to it (as a scheduler signals
    the whole process group): every batch still arrives; the training process decides."""
    import os
    import signal
    import time

    from mesh_megatron.training.preemption import Preemption

    train = TrainingConfig(micro_batch_size=2, global_batch_size=4, train_iters=3)
    data = Samples(20)
    preemption = Preemption().install()
    try:
        it = iter(train_loader(data, train, 0, 1, 0, torch.device("cpu"), 1))
        got = [next(it)]
        (worker,) = it._workers
        for sig in (signal.SIGTERM, signal.SIGINT):
            os.kill(worker.pid, sig)
        time.sleep(0.5)  # let the signals land before the next batch is asked for
        got += list(it)
        assert worker.exitcode in (None, 0)  # alive until the loader ended it, never killed by a signal
    finally:
        preemption.uninstall()
    assert preemption.received is None  # the signals went to the worker, not to this process
    want = [collate(data, idx) for step in range(3) for idx in micro_batch_indices(step, 2, 4, 0, 1, 20)]
    assert len(got) == len(want) and all(torch.equal(g[0], w[0]) for g, w in zip(got, want))
    assert "received" not in capfd.readouterr().err
