"""Weight initialisation that does not depend on how the model is split.

Each parameter is drawn whole from its own generator, seeded by (seed, parameter name),
then this rank keeps its tensor-parallel slice. So a model built as one piece, as TP
shards or as pipeline stages (which build different subsets in different orders) starts
from the same weights, and a looped model and its unrolled copy can be compared.

Rules (docs/MESH_METHOD.md section 1, GPT-NeoX small init):
  * every weight matrix and the word embeddings: N(0, init_std), init_std = sqrt(2 / (5h));
  * attention dense and MLP down-projection (linear_proj, linear_fc2): init_std / sqrt(2 * compute depth);
  * biases 0; LayerNorm weight 1, bias 0;
  * MeSH routers: truncated normal, std sqrt(2 / (B * h)), at 3 std; bias 0, or with
    `mesh_router_init: base` +margin on each step's own slot (state_passing.router_bias);
  * input injection's concat adapter: [I, I] (starts as `add`);
  * shared MeSH routers' step embedding: 0 (the routers start step-agnostic);
  * learned state scalars: `learned_scalar_init`;
  * relaxed sharing (model/relaxation.py): `lora_A` draws its layer's weight rule (N(0, init_std),
    or the output-projection std for linear_proj / linear_fc2), `lora_B` and every `*_delta` 0,
    so a fresh relaxed model computes exactly the plain recursion.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from mesh_megatron.config import ModelConfig
from mesh_megatron.model.state_passing import router_bias

OUTPUT_PROJECTIONS = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")


def _full_shape(p: torch.Tensor, tp_size: int) -> list[int]:
    shape = list(p.shape)
    if getattr(p, "tensor_model_parallel", False):
        shape[p.partition_dim] *= tp_size
    return shape


def _draw(name: str, shape: list[int], config: ModelConfig, gen: torch.Generator) -> torch.Tensor:
    if name.endswith((".lora_B", "_delta")):
        return torch.zeros(shape)
    if name.endswith(".lora_A"):
        output = any(f".{p.split('.')[1]}.lora_A" in name for p in OUTPUT_PROJECTIONS)
        std = config.output_proj_init_std if output else config.weight_init_std
        return torch.empty(shape).normal_(0.0, std, generator=gen)
    if name.endswith("state_passing.scalars"):
        return torch.tensor(config.learned_scalar_init).expand(shape).clone()
    if name.endswith("injection.adapter.weight"):  # Linear(2h -> h) = [I, I]: starts as the `add` injection
        return torch.cat([torch.eye(shape[0]), torch.eye(shape[0])], dim=1)
    if name.endswith("state_passing.step_embedding"):  # shared MeSH routers' step vectors: start at 0
        return torch.zeros(shape)
    if "_routers." in name:
        if name.endswith(".bias"):  # ...state_passing.{write,read}_routers.{step}.bias
            return router_bias(shape[0], int(name.split(".")[-2]), config.router_margin)
        std = math.sqrt(2.0 / (config.slots * config.hidden_size))
        w = torch.empty(shape)
        nn.init.trunc_normal_(w, std=std, a=-3 * std, b=3 * std, generator=gen)
        return w
    if "layernorm" in name:
        return torch.ones(shape) if name.endswith(".weight") else torch.zeros(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    std = config.output_proj_init_std if name.endswith(OUTPUT_PROJECTIONS) else config.weight_init_std
    return torch.empty(shape).normal_(0.0, std, generator=gen)


def tag_tensor_parallel_weights(model: nn.Module) -> None:
    """Make sure every split weight carries megatron's `tensor_model_parallel`/`partition_dim`
    tags. megatron sets them only while initialising (skipped for meta-device builds), and
    checkpoint merging and this module's init read them."""
    from megatron.core import tensor_parallel

    dims = ((tensor_parallel.ColumnParallelLinear, 0), (tensor_parallel.RowParallelLinear, 1),
            (tensor_parallel.VocabParallelEmbedding, 0))
    for module in model.modules():
        for cls, dim in dims:
            if isinstance(module, cls) and not getattr(module.weight, "tensor_model_parallel", False):
                tensor_parallel.set_tensor_model_parallel_attributes(module.weight, True, dim, 1)


@torch.no_grad()
def initialize_parameters(model: nn.Module, config: ModelConfig, seed: int,
                          tp_rank: int = 0, tp_size: int = 1) -> None:
    """Fill every parameter of `model` (one TP shard, one pipeline stage or the whole model)."""
    for name, p in model.named_parameters():
        if p.is_meta:
            continue
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        full = _draw(name, _full_shape(p, tp_size), config, gen)
        if getattr(p, "tensor_model_parallel", False):
            full = torch.chunk(full, tp_size, dim=p.partition_dim)[tp_rank]
        p.copy_(full.to(p.dtype))
