"""Small in-process models for unit tests: a validated `tiny` preset built with a fixed
per-name init, and a reproducible token batch for it (tests/unit/test_execution.py,
test_relaxation.py, test_mor.py)."""

import torch

from mesh_megatron.config import preset, to_transformer_config, validate
from mesh_megatron.model import MeshGPTModel


def build(variant, layout=None, execution=None, seed=11, seq=16, **overrides):
    """MeshGPTModel of preset `tiny` at sequence length `seq` (config fields in `overrides`)."""
    cfg = preset("tiny", variant, layout, **{"seq_length": seq, **overrides})
    validate(cfg)
    return MeshGPTModel(cfg, to_transformer_config(cfg), execution=execution, init_seed=seed)


def tokens(seed=0, seq=16, batch=2):
    """(inputs, labels) [batch, seq], labels the inputs shifted by one."""
    t = torch.randint(0, 4096, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))
    return t[:, :-1], t[:, 1:]


def train_step(model, inputs, labels, seed=5):
    """(loss, {name: grad}) of one training-mode forward/backward from a fixed RNG (dropout)."""
    from mesh_megatron.parallel.initialize import set_seed

    set_seed(seed)
    model.train()
    loss = model(inputs, labels=labels).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
