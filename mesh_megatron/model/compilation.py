"""--compile: torch.compile of each transformer layer, in place.

Each layer of the block (prelude, the looped core, coda) gets `nn.Module.compile()`, which
compiles the module's call (forward and its hooks) without wrapping it, so parameter names,
checkpoints and the export are those of the eager model. The looped core is one layer run K
times: its graph is compiled once (per distinct input shape) and reused by every iteration;
relaxed sharing's per-iteration adapters read the iteration number (LoopIndex) inside the
layer, so dynamo guards on it and keeps one graph per iteration.

Only the layers: the embedding, the state passing between iterations (MeSH routers, a few
small ops), the output layer and the vocab-parallel cross entropy stay eager. They hold
megatron's tensor-parallel collectives and are a small share of a step's time, and leaving
them out keeps dynamo away from process-group calls. Under --recompute the compiled layer
is what megatron's checkpoint reruns in backward.
"""

from __future__ import annotations

from torch import nn


def compile_layers(block: nn.Module) -> int:
    """Compile every transformer layer of a RecursiveBlock in place; returns how many."""
    layers = [*block.prelude.values(), *block.core, *block.coda.values()]
    for layer in layers:
        layer.compile()
    return len(layers)
