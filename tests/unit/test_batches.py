"""The DataLoader path reads exactly the samples data/sampler assigns, from any step on, and
StepsAhead hands them out by step with the next step read ahead."""

import threading

import pytest
import torch

from mesh_megatron.config import TrainingConfig
from mesh_megatron.data.sampler import collate, micro_batch_indices
from mesh_megatron.training.batches import StepSampler, StepsAhead, train_loader


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

class Watched(Samples):
    """Samples that record which indices were read, and can fail at one of them."""

    def __init__(self, n, fail_at=None):
        super().__init__(n)
        self.read, self.fail_at = [], fail_at
        self.changed = threading.Condition()

    def __getitem__(self, i):
        if i == self.fail_at:
            raise ValueError(f"sample {i} is corrupt")
        with self.changed:
            self.read.append(i)
            self.changed.notify_all()
        return super().__getitem__(i)

    def wait_for(self, indices, timeout=30.0):
        """True once every index in `indices` was read (an event, not a timing assertion)."""
        with self.changed:
            return self.changed.wait_for(lambda: set(indices) <= set(self.read), timeout)


def step_indices(train, step, dp_rank=0, dp_size=1, n=1000):
    return [i for idx in micro_batch_indices(step, train.micro_batch_size, train.global_batch_size, dp_rank,
                                             dp_size, n) for i in idx]


@pytest.mark.parametrize("accum,first_step", [(1, 0), (3, 2), (7, 0)])
def test_steps_ahead_groups_the_loader_by_step_and_resumes_exactly(accum, first_step):
    train = TrainingConfig(micro_batch_size=2, global_batch_size=2 * accum, train_iters=5)
    data = Samples(23)
    loader = train_loader(data, train, 0, 1, first_step, torch.device("cpu"), 0)
    got = list(StepsAhead(loader, accum))
    assert len(got) == 5 - first_step
    for step, micro_batches in zip(range(first_step, 5), got):
        want = [collate(data, idx) for idx in micro_batch_indices(step, 2, 2 * accum, 0, 1, len(data))]
        assert len(micro_batches) == accum
        for g, w in zip(micro_batches, want):
            assert all(torch.equal(a, b) for a, b in zip(g, w))


def test_steps_ahead_reads_the_next_step_while_this_one_computes():
    """7 micro-batches per step, more than any DataLoader read-ahead without workers: once
    step 0 is handed out, step 1 is read in full without being asked for, and step 2 then
    waits (one step ahead, not the whole epoch)."""
    train = TrainingConfig(micro_batch_size=2, global_batch_size=14, train_iters=6)
    data = Watched(1000)
    steps = StepsAhead(train_loader(data, train, 0, 1, 0, torch.device("cpu"), 0), accum=7)
    try:
        next(steps)  # step 0 "computes" from here on; step 1 is not requested
        assert data.wait_for(step_indices(train, 1)), data.read
        assert data.wait_for(step_indices(train, 2)), data.read  # read, then blocked: queue holds step 1
        assert not set(step_indices(train, 3)) & set(data.read)
        step1, want = next(steps), [collate(data, idx) for idx in micro_batch_indices(1, 2, 14, 0, 1, 1000)]
        assert len(step1) == 7 and all(torch.equal(g[0], w[0]) for g, w in zip(step1, want))
    finally:
        steps.close()
    assert not steps._thread.is_alive()


def test_steps_ahead_raises_a_read_error_at_its_step():
    train = TrainingConfig(micro_batch_size=2, global_batch_size=4, train_iters=4)
    bad = step_indices(train, 2)[1]
    steps = StepsAhead(train_loader(Watched(1000, fail_at=bad), train, 0, 1, 0, torch.device("cpu"), 0), accum=2)
    next(steps), next(steps)
    with pytest.raises(ValueError, match=f"sample {bad} is corrupt"):
        next(steps)
    steps.close()
