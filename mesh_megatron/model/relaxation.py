"""Relaxed weight sharing: what the shared core is at loop iteration t (arXiv 2410.20672).

Relaxed Recursive Transformers (Bae et al.) give every unrolled position of the shared core
its own low-rank adapter: at iteration t, a target linear W of core layer c computes

    y = W x + b + (alpha / r) * B_{t,c} A_{t,c} x          A: [r, in], B: [out, r]

and, optionally, its own bias and LayerNorm affine (the paper's `ln_share` off):

    b_t = b + db_t                                              (--relax-biases)
    LN_t(x) = LN(x) + norm(x) * dw_t + db_t                     (--relax-norms)

The shared weights stay where they are (`linear_qkv.weight`), so checkpoints of a plain
recursion and of a relaxed one share every name but the adapters'. The per-iteration tensors
are stacked over the K iterations: `lora_A` [K, r, in], `lora_B` [K, out, r], `bias_delta`
[K, out], a norm's `weight_delta`/`bias_delta` [K, hidden]. From scratch A draws the layer's
own init and B, the deltas 0: the model starts exactly as the plain recursion.

How: `relaxed_core_spec` rewrites the core layer's ModuleSpec so each target is built by
`Relaxed`, which builds the original module (any backend: megatron's local or TE linears and
norms) and adds the parameters and a forward hook: no layer is forked. The hook reads the
iteration from a `LoopIndex` the RecursiveBlock shares with it, and the block sets it inside
the function megatron's checkpoint reruns, so a recomputed iteration uses its own adapters.

Tensor parallelism (input never sequence-parallel here):
    column-parallel W [out/tp, in]: A [r, in] replicated, B [out/tp, r] split by rows;
        h = x A^T goes through copy_to_tensor_model_parallel_region (identity forward,
        all-reduce backward), so every rank gets A's full gradient and x its full input grad.
    row-parallel W [out, in/tp]: A [r, in/tp] split by columns, B [out, r] replicated;
        h = reduce_from_tensor_model_parallel_region(x_shard A_shard^T) (all-reduce forward)
        is the full x A^T on every rank, so B's gradient is whole and identical everywhere.
Replicated adapters therefore need no extra gradient reduction: like the LayerNorm weights
(no sequence parallelism), every TP rank computes the same full gradient. Only r numbers per
token cross the TP group, in one direction each.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron.core.transformer.spec_utils import ModuleSpec, build_module

# Pythia (HF) name of a target -> (where it sits in the layer spec, its training name, parallel style)
TARGET_SPECS: dict[str, tuple[str, str, str]] = {
    "query_key_value": ("self_attention", "linear_qkv", "column"),
    "dense": ("self_attention", "linear_proj", "row"),
    "dense_h_to_4h": ("mlp", "linear_fc1", "column"),
    "dense_4h_to_h": ("mlp", "linear_fc2", "row"),
}
NORMS = ("input_layernorm", "post_attention_layernorm")
# Suffixes of the parameters this module adds (initialization.py and the optimizer read them).
ADAPTER_SUFFIXES = (".lora_A", ".lora_B")
DELTA_SUFFIXES = (".bias_delta", ".weight_delta")


class LoopIndex:
    """The loop iteration the core is computing (None outside the loop)."""

    def __init__(self):
        self.t: Optional[int] = None


@dataclass
class Relaxation:
    """What a Relaxed module adds; `kind` column / row / norm."""
    kind: str
    loops: int
    loop: LoopIndex
    rank: int = 0
    scale: float = 1.0
    bias: bool = False


def _tp_tag(p: nn.Parameter, dim: int) -> nn.Parameter:
    from megatron.core import tensor_parallel

    tensor_parallel.set_tensor_model_parallel_attributes(p, True, dim, 1)
    return p


class Relaxed:
    """ModuleSpec entry: `Relaxed(*args, base=spec, relax=Relaxation, **kwargs)` builds `base`
    as usual and returns it with the per-iteration parameters and the hook attached."""

    def __new__(cls, *args, base, relax: Relaxation, **kwargs):
        module = build_module(base, *args, **kwargs)
        attach(module, relax)
        return module


def attach(module: nn.Module, relax: Relaxation) -> None:
    w = module.weight
    make = lambda *shape: nn.Parameter(torch.zeros(*shape, dtype=w.dtype, device=w.device))  # noqa: E731
    K = relax.loops
    if relax.kind == "norm":
        module.weight_delta = make(K, w.shape[0])
        module.bias_delta = make(K, w.shape[0])
        module.register_forward_hook(_norm_hook)
    else:
        out_features, in_features = w.shape  # this rank's shard
        column = relax.kind == "column"
        if relax.rank:
            module.lora_A = make(K, relax.rank, in_features)
            module.lora_B = make(K, out_features, relax.rank)
            _tp_tag(module.lora_B if column else module.lora_A, 1 if column else 2)
        if relax.bias:
            module.bias_delta = make(K, out_features)
            if column:
                _tp_tag(module.bias_delta, 1)
        module.register_forward_hook(_column_hook if column else _row_hook)
    module.relaxation = relax


def _iteration(module: nn.Module) -> int:
    t = module.relaxation.loop.t
    if t is None:
        raise RuntimeError("a relaxed core layer ran outside the loop: RecursiveBlock sets its loop index")
    return t


def _linear_delta(module: nn.Module, x: Tensor, t: int, column: bool) -> Optional[Tensor]:
    from megatron.core import tensor_parallel

    delta = None
    if hasattr(module, "lora_A"):
        h = F.linear(x, module.lora_A[t])  # [s, b, r] (row-parallel: this rank's partial sum)
        h = (tensor_parallel.copy_to_tensor_model_parallel_region(h) if column
             else tensor_parallel.reduce_from_tensor_model_parallel_region(h))
        delta = F.linear(h, module.lora_B[t]) * module.relaxation.scale
    if hasattr(module, "bias_delta"):
        delta = module.bias_delta[t] if delta is None else delta + module.bias_delta[t]
    return delta


def _add(output, delta: Optional[Tensor]):
    if delta is None:
        return output
    out, bias = output  # megatron's linears return (output, bias or None)
    return out + delta, bias


def _column_hook(module, args, output):
    return _add(output, _linear_delta(module, args[0], _iteration(module), column=True))


def _row_hook(module, args, output):
    return _add(output, _linear_delta(module, args[0], _iteration(module), column=False))


def _norm_hook(module, args, output):
    t = _iteration(module)
    x = args[0]
    eps = getattr(module, "eps", 1e-5)
    normed = F.layer_norm(x, (x.shape[-1],), eps=eps)
    return output + normed * module.weight_delta[t] + module.bias_delta[t]


# --------------------------------------------------------------------------------------
# The core layer's spec
# --------------------------------------------------------------------------------------

def relaxed_core_spec(layer_spec: ModuleSpec, config, loop: LoopIndex) -> ModuleSpec:
    """The core layer's spec with each target wrapped by `Relaxed`; `layer_spec` itself when
    the config relaxes nothing."""
    if not config.is_relaxed:
        return layer_spec
    loops = config.parsed_layout.loops
    spec = copy.deepcopy(layer_spec)
    subs = spec.submodules
    targets = set(config.lora_target_names) if config.lora_rank else set()
    for hf_name, (parent, attr, kind) in TARGET_SPECS.items():
        if hf_name not in targets and not config.relax_biases:
            continue
        parent_spec = getattr(subs, parent)
        relax = Relaxation(kind=kind, loops=loops, loop=loop, rank=config.lora_rank if hf_name in targets else 0,
                           scale=config.lora_scale, bias=config.relax_biases)
        parent_spec.submodules = dataclasses.replace(parent_spec.submodules, **{attr: ModuleSpec(
            module=Relaxed, params={"base": getattr(parent_spec.submodules, attr), "relax": relax})})
    if config.relax_norms:
        for norm in NORMS:
            setattr(subs, norm, ModuleSpec(module=Relaxed, params={
                "base": getattr(subs, norm), "relax": Relaxation(kind="norm", loops=loops, loop=loop)}))
    return spec
