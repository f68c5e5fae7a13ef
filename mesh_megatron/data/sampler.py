"""Which samples each data-parallel rank reads, as a pure function of the step.

Optimizer step i consumes samples [i*G, (i+1)*G) of the dataset (G = global batch) in
order. Micro-batch a of that step on data-parallel rank r reads
    [i*G + (a*D + r)*m, ... + m)                 (m = micro batch, D = data-parallel size)
so one rank with grad-accum 2 reads exactly what two ranks read, and a resumed run
continues at the next unread sample: nothing is replayed or skipped.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


def micro_batch_indices(step: int, micro: int, global_batch: int, dp_rank: int, dp_size: int,
                        dataset_len: int) -> Iterator[list[int]]:
    accum = global_batch // (micro * dp_size)
    base = step * global_batch
    for a in range(accum):
        start = base + (a * dp_size + dp_rank) * micro
        yield [(start + j) % dataset_len for j in range(micro)]


def collate_samples(samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [m, s], labels [m, s], loss_mask [m, s]) from GPTDataset samples (the
    DataLoader's collate_fn)."""

    def stack(key):
        return torch.stack([torch.as_tensor(np.asarray(s[key])) for s in samples])

    return stack("tokens").long(), stack("labels").long(), stack("loss_mask").float()


def collate(dataset, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The micro-batch of `indices` from a megatron GPTDataset (see collate_samples)."""
    return collate_samples([dataset[i] for i in indices])
