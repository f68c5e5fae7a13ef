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


def fused_adamw_for(device: torch.device) -> bool:
    """torch's fused AdamW (one kernel per step for all tensors) on CUDA; elsewhere the default
    (foreach) implementation, so CPU runs keep their numbers. The model is built on the host
    (use_cpu_initialization) and DeepSpeed moves it, so the choice follows the engine's device,
    not where the parameters are when the optimizer is made."""
    return device.type == "cuda"


def adamw(model: torch.nn.Module, train: TrainingConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW with the paper's betas; biases and norm weights (1-D tensors, and their per-iteration
    `*_delta` of relaxed sharing) are not decayed."""
    def decayed(name: str, p: torch.Tensor) -> bool:
        return p.ndim >= 2 and not name.endswith("_delta")

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if decayed(n, p)]
    no_decay = [p for n, p in named if not decayed(n, p)]
    groups = [{"params": decay, "weight_decay": train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.adam_beta1, train.adam_beta2),
                             eps=train.adam_eps, fused=fused or None)


def keep_fused_choice(optimizer: torch.optim.Optimizer, fused: bool) -> None:
    """After loading a checkpoint: torch's load_state_dict takes `fused` from the saved param
    groups, so a run would inherit the writer's choice (a CUDA run's checkpoint resumed on CPU,
    or the reverse). Restore this run's choice and put each `step` counter where that
    implementation keeps it (on the parameter's device for fused, on the host otherwise:
    the unfused step reads it with .item()). The checkpoint's contents are the same either way."""
    for group in optimizer.param_groups:
        group["fused"] = fused or None
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(dtype=torch.float32, device=p.device if fused else "cpu")
