"""Learning-rate schedule: linear warmup, then cosine decay to min_lr (Megatron's shape)."""

from __future__ import annotations

import math

import torch

from mesh_megatron.config import TrainingConfig


def lr_at(step: int, train: TrainingConfig) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    warmup = int(round(train.lr_warmup_fraction * train.train_iters))
    if warmup and step < warmup:
        return train.lr * (step + 1) / warmup
    decay_steps = max(1, train.train_iters - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1 + math.cos(math.pi * progress))


def cosine_with_warmup(optimizer: torch.optim.Optimizer, train: TrainingConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR (its state is saved in DeepSpeed checkpoints) following lr_at()."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, train) / train.lr)


def adamw(model: torch.nn.Module, train: TrainingConfig) -> torch.optim.AdamW:
    """AdamW with the paper's betas; biases and norm weights (1-D tensors) are not decayed."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.adam_beta1, train.adam_beta2),
                             eps=train.adam_eps)
