"""prelude -> core x K -> coda, with the state passing between iterations.

    h_pre = prelude(h_emb)
    h0, carry = start(h_emb, h_pre)            # MeSH: transitional write/read
    for t in 0..n-1:                            # n = K, or drawn per micro-batch (model/recurrence.py)
        y = core(h_t)                           # the same weights every iteration
        h_{t+1}, carry = step(t, h_t, y, carry)
    out = coda(h_K)

`vanilla` is a plain stack held in `prelude`. `vanilla+mesh` keeps K *distinct* core
blocks (`core` then holds C*K layers, block t = layers t*C .. t*C+C-1) with the MeSH
buffer between them. Layer numbers (1-based, as megatron counts) follow unique layers:
prelude, core, coda, the same order the export uses.

Activation recomputation (`recompute`, megatron-core's RNG-aware tensor_parallel.checkpoint,
so dropout draws the same numbers when the forward reruns in backward):
    none    every layer's activations are kept
    loop    prelude and coda are recomputed as blocks and each core iteration as one block:
            only the states between iterations (and what the state passing keeps) stay
            live, so activation memory no longer grows with C per iteration. `vanilla`
            has no loop and recomputes per layer.
    layer   each layer is recomputed on its own (only layer inputs stay live)

Mixture-of-Recursions (model/mor.py): its state passing also `select`s the tokens iteration t
processes (gathered, with their rotary rows); `step` scatters the core's output back.

Relaxed sharing (model/relaxation.py): the core's layers may add iteration t's own adapters;
they read t from `self.loop`, set in `_layers`, i.e. inside what a recompute reruns.

Under pipeline parallelism a block holds only its stage's pieces (parallel/pipeline_layout).
Prelude and coda layers are keyed by their global index (`prelude.5` is prelude layer 5 on
whichever stage owns it), so every stage's parameter names are the full model's names.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from mesh_megatron.config import ModelConfig, RecurrenceConfig
from mesh_megatron.model.injection import build_injection
from mesh_megatron.model.recurrence import RecurrenceKey, loop_plan
from mesh_megatron.model.relaxation import LoopIndex, relaxed_core_spec
from mesh_megatron.model.state_passing import build_state_passing

# Observer of block states for diagnostics: called with (name, state [s, b, h]).
StateObserver = Callable[[str, Tensor], None]


class RecursiveBlock(MegatronModule):
    def __init__(self, config: ModelConfig, tf_config: TransformerConfig, layer_spec: ModuleSpec,
                 prelude: Optional[list[int]] = None, has_core: bool = True,
                 coda: Optional[list[int]] = None, recompute: str = "none",
                 recurrence: Optional[RecurrenceConfig] = None):
        """`prelude`/`coda`: the global layer indices this stage holds (default: all);
        `has_core`: whether the looped core (and its state passing) lives here;
        `recompute`: none / loop / layer (module docstring);
        `recurrence`: iterations per training forward (model/recurrence.py; None: K)."""
        super().__init__(config=tf_config)
        self.model_config = config
        self.recompute = recompute
        self.recurrence = recurrence
        self.recomputed = 0  # forwards rerun in backward under recompute (the trainer reports it)
        layout = config.parsed_layout
        self.loops = layout.loops
        self.core_layers = layout.core
        n_core = layout.core * (1 if config.core_shared else layout.loops)
        prelude = list(range(layout.prelude)) if prelude is None else prelude
        coda = list(range(layout.coda)) if coda is None else coda

        # Relaxed sharing: the core's layers read the iteration from `loop` (model/relaxation.py).
        self.loop = LoopIndex()
        core_spec = relaxed_core_spec(layer_spec, config, self.loop)

        def layer(number: int, spec: ModuleSpec = layer_spec) -> nn.Module:
            return build_module(spec, config=tf_config, layer_number=number)

        self.prelude = nn.ModuleDict({str(i): layer(i + 1) for i in prelude})
        has_core = has_core and layout.is_looped
        core_offset = layout.prelude
        self.core = nn.ModuleList(layer(core_offset + i + 1, core_spec) for i in range(n_core if has_core else 0))
        coda_offset = layout.prelude + n_core
        self.coda = nn.ModuleDict({str(i): layer(coda_offset + i + 1) for i in coda})
        self.state_passing = build_state_passing(config) if has_core else None
        self.injection = build_injection(config) if has_core and layout.is_looped else None  # model/injection.py

    def core_block(self, t: int) -> nn.ModuleList:
        """The layers applied in iteration t: the shared core, or block t when unshared."""
        if self.model_config.core_shared:
            return self.core
        return self.core[t * self.core_layers:(t + 1) * self.core_layers]

    def _layers(self, layers, h: Tensor, rotary_pos_emb: Tensor, attention_mask: Optional[Tensor],
                t: Optional[int] = None) -> Tensor:
        self.loop.t = t  # set here, inside what a recompute reruns: iteration t's own adapters
        for layer in layers:
            h = layer(h, rotary_pos_emb, attention_mask)
        return h

    def _run(self, layers, h: Tensor, rotary_pos_emb: Tensor, attention_mask: Optional[Tensor],
             t: Optional[int] = None) -> Tensor:
        """Apply `layers` (loop iteration `t`, None outside the loop) in order; under recompute
        (training only) keep just the inputs of each layer (`layer`) or of the whole run (`loop`)
        and rerun the forward in backward."""
        layers = list(layers)
        if self.recompute == "none" or not self.training or not layers or not torch.is_grad_enabled():
            return self._layers(layers, h, rotary_pos_emb, attention_mask, t)
        if not h.requires_grad:
            # The state after a no_grad prefix (truncated backprop): megatron's checkpoint is an
            # autograd.Function, whose output needs an input that requires grad, or the
            # weights inside get no gradient.
            h = h.detach().requires_grad_()
        if self.recompute == "layer" or not self.core_layers:  # vanilla has no loop: per layer
            for layer in layers:
                h = tensor_parallel.checkpoint(self._counted(
                    lambda x, rot, mask, layer=layer: self._layers([layer], x, rot, mask, t)), False, h,
                    rotary_pos_emb, attention_mask)
            return h
        return tensor_parallel.checkpoint(
            self._counted(lambda x, rot, mask: self._layers(layers, x, rot, mask, t)), False, h, rotary_pos_emb,
            attention_mask)

    def _counted(self, run: Callable) -> Callable:
        """`run`, counting its reruns: megatron's checkpoint calls it under no_grad in forward
        and again with grad enabled in backward (the recomputation)."""
        def counted(*args):
            if torch.is_grad_enabled():
                self.recomputed += 1
            return run(*args)
        return counted

    def forward(self, hidden: Tensor, h_emb: Optional[Tensor], rotary_pos_emb: Tensor,
                attention_mask: Optional[Tensor] = None, observe: Optional[StateObserver] = None,
                recurrence_key: Optional[RecurrenceKey] = None) -> Tensor:
        # hidden: [s, b, h] entering this stage (on the first stage: h_emb itself);
        # h_emb: the scaled embeddings, needed where the core reads them (else may be None).
        h = self._run(self.prelude.values(), hidden, rotary_pos_emb, attention_mask)
        if self.state_passing is not None:
            if observe:
                observe("h_pre", h)
            e = h
            h, carry = self.state_passing.start(h_emb, h)
            if self.injection is not None:
                h = self.injection.initial_state(h, self.training)
            if observe:
                observe("h0", h)
            plan = loop_plan(self.recurrence, self.loops, recurrence_key, self.training)
            select = getattr(self.state_passing, "select", None)  # MoR: a subset of the tokens
            for t in range(plan.iterations):
                with plan.grad(t):  # the first plan.no_grad iterations: no_grad (truncated backprop)
                    x, rot, mask = h, rotary_pos_emb, attention_mask
                    if select is not None:  # (MoR has no injection and a fixed K: config refuses them)
                        x, rot, mask, carry = select(t, h, rotary_pos_emb, attention_mask, carry)
                    elif self.injection is not None:
                        x = self.injection.core_input(h, e)
                    y = self._run(self.core_block(t), x, rot, mask, t)
                    h, carry = self.state_passing.step(t, h, y, carry)
                if observe:
                    observe(f"h{t + 1}", h)
        return self._run(self.coda.values(), h, rotary_pos_emb, attention_mask)
