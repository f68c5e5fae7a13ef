"""Split a full (TP=1) state dict into tensor-parallel shards, and gather shards back.

megatron-core tags every split parameter with `tensor_model_parallel=True` and its
`partition_dim`; that tag is the whole rule, so no per-layer table is needed. Our QKV
weight is megatron's per-head [q, k, v] layout, so contiguous chunks are whole heads.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


def partition_dims(model: nn.Module) -> dict[str, int]:
    """name -> the dimension split across TP ranks, for the split parameters only."""
    return {
        name: p.partition_dim
        for name, p in model.named_parameters()
        if getattr(p, "tensor_model_parallel", False)
    }


def shard_state_dict(full: dict[str, Tensor], model: nn.Module, tp_rank: int, tp_size: int) -> dict[str, Tensor]:
    """This rank's slice of every split tensor; replicated tensors are copied whole."""
    dims = partition_dims(model)
    out = {}
    for name, tensor in full.items():
        if name in dims:
            out[name] = torch.chunk(tensor, tp_size, dim=dims[name])[tp_rank].clone()
        else:
            out[name] = tensor
    return out


def gather_tensor(shard: Tensor, dim: int, group) -> Tensor:
    """All-gather a tensor split along `dim` over `group` (every rank gets the full tensor)."""
    pieces = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, shard.contiguous(), group=group)
    return torch.cat(pieces, dim=dim)


def gather_state(named: dict[str, Tensor], model: nn.Module, group) -> dict[str, Tensor]:
    """Full tensors from this rank's shards (e.g. parameters or their gradients)."""
    dims = partition_dims(model)
    return {
        name: gather_tensor(t, dims[name], group) if name in dims else t
        for name, t in named.items()
    }
