"""Which states the probe reads from a Hugging Face model, and how.

Looped variants (`mesh_gpt_neox`, modeling_mesh.py) return them with
`output_hidden_states=True`: (h_emb, h_pre, h0, h_1 .. h_K, h_out). The probe keeps
h_emb, h0, h_1 .. h_K, h_out (docs/MESH_METHOD.md section 6); h_pre is h0 for every
variant but MeSH, whose h_emb -> h0 block is the prelude plus the transitional read.
MeSH router weights are recorded by forward hooks on the routers: `[b, s, B]` softmax
outputs per step (0 = transitional, t + 1 = loop step t).

`vanilla` exports as transformers' own GPT-NeoX, which has no loop states: hooks record
h_emb (the embedding output, sqrt(h) folded in) and the output of every layer. By default
every layer is one block (states h_emb, layer_1 .. layer_{N-1}, h_out); given the layout
P+CrK+Q of the looped model it is matched with (P + C*K + Q = N), the states are taken at
the same depths as the looped model's: h0 after P layers, h_t after P + t*C, h_out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from mesh_megatron.config import ConfigError, Layout


@dataclass
class Capture:
    """One batch's states, in `StateReader.names` order, each [b, s, h]; MeSH router
    weights per step, each [b, s, B] (empty lists for other variants)."""

    states: list[Tensor]
    write: list[Tensor]
    read: list[Tensor]
    # MoR: per recursion (router logits, processed, active), each [b, s], of the full-sequence forward
    # (training's top-k routing); empty for other variants
    mor: tuple = ()
    # token-choice MoR: (depth [b, s] 0-based, router probabilities [b, s, K]) of the full-sequence forward
    mor_depth: tuple = ()


class StateReader:
    """Runs a causal-LM Hugging Face model (GPT-NeoX or MeSH GPT-NeoX) and returns its states.

    `names`: the states in order; `blocks`: (block name, input state, output state) of each
    block application whose relative update is measured; `router_steps`: names of the MeSH
    steps (empty without routers); `slots`: B (0 without routers).
    """

    def __init__(self, model: nn.Module, vanilla_layout: Optional[str] = None, num_loops: Optional[int] = None):
        """`num_loops`: run the loop N times instead of the trained K (a looped export only)."""
        self.model = model
        cfg = model.config
        self.num_loops = num_loops
        if num_loops is not None:
            if cfg.model_type != "mesh_gpt_neox":
                raise ConfigError(f"--num-loops needs a looped model (mesh_gpt_neox); this one is {cfg.model_type}")
            if num_loops < 1 or (cfg.fixed_depth and num_loops > cfg.num_loops):
                raise ConfigError(f"--num-loops {num_loops}: this {cfg.state_passing} model runs 1.."
                                  f"{cfg.num_loops if cfg.fixed_depth else 'any'} loop iterations"
                                  + (" (it has weights per step)" if cfg.fixed_depth else ""))
        self.router_steps: list[str] = []
        self.slots = 0
        if cfg.model_type == "mesh_gpt_neox":
            if vanilla_layout:
                raise ConfigError(f"--layout is for vanilla models only: this one is "
                                  f"{cfg.state_passing} with its own loop")
            loops = cfg.num_loops if num_loops is None else num_loops
            self.variant = cfg.state_passing
            self.layout = f"{cfg.num_prelude_layers}+{cfg.num_core_layers}R{loops}+{cfg.num_coda_layers}"
            self.names = ["h_emb", "h0", *[f"h_{t}" for t in range(1, loops + 1)], "h_out"]
            # indices into modeling_mesh's hidden_states (h_emb, h_pre, h0, h_1..h_K, h_out)
            self._pick = [0, *range(2, loops + 4)]
            labels = ["prelude", *[f"loop {t}" for t in range(1, loops + 1)], "coda"]
            if model.gpt_neox.mesh is not None:
                self.slots = cfg.mesh_slots
                self.router_steps = ["transitional", *[f"loop {t}" for t in range(1, loops + 1)]]
        elif cfg.model_type == "gpt_neox":
            n = cfg.num_hidden_layers
            self.variant = "vanilla"
            self.layout = str(n)
            if vanilla_layout:
                layout = Layout.parse(vanilla_layout)
                if not layout.is_looped or layout.compute_depth != n:
                    raise ConfigError(f"--layout {vanilla_layout} does not match this {n}-layer vanilla model: "
                                      f"give P+CrK+Q with P + C*K + Q = {n}")
                self._after = [layout.prelude + t * layout.core for t in range(layout.loops + 1)] + [n]
                self.names = ["h_emb", "h0", *[f"h_{t}" for t in range(1, layout.loops + 1)], "h_out"]
                labels = ["prelude", *[f"block {t}" for t in range(1, layout.loops + 1)], "coda"]
            else:
                self._after = list(range(1, n + 1))  # states after layer 1 .. n
                self.names = ["h_emb", *[f"layer_{i}" for i in range(1, n)], "h_out"]
                labels = [f"layer {i}" for i in range(1, n + 1)]
        else:
            raise ConfigError(f"model type {cfg.model_type!r} cannot be probed: export a checkpoint of this "
                              "project (mesh_gpt_neox) or load a GPT-NeoX model")
        self.blocks = [(label, self.names[i], self.names[i + 1]) for i, label in enumerate(labels)]

    @torch.no_grad()
    def __call__(self, input_ids: Tensor) -> Capture:
        """input_ids [b, s] on the model's device -> the states of that batch."""
        base = self.model.gpt_neox
        if self.variant != "vanilla":
            write, read = [], []
            hooks = []
            if self.slots:
                for routers, sink in ((base.mesh.write_routers, write), (base.mesh.read_routers, read)):
                    hooks += [r.register_forward_hook(lambda _m, _i, out, sink=sink: sink.append(out))
                              for r in routers]
            try:
                hidden = base(input_ids, use_cache=False, output_hidden_states=True,
                              num_loops=self.num_loops).hidden_states
            finally:
                for h in hooks:
                    h.remove()
            mor, depth = (), ()
            if getattr(base, "mor", None) is not None:
                mor = tuple(base.mor.last)
                if base.mor.router is not None:  # token choice
                    depth = (base.mor.depth, base.mor.probs)
            return Capture([hidden[i] for i in self._pick], write, read, mor, depth)

        outputs: list[Tensor] = []

        def keep(_module, _inputs, out):
            outputs.append(out[0] if isinstance(out, tuple) else out)

        hooks = [base.get_input_embeddings().register_forward_hook(keep)]
        hooks += [layer.register_forward_hook(keep) for layer in base.layers]
        try:
            base(input_ids, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        # outputs[0] = h_emb, outputs[i] = after layer i
        return Capture([outputs[0], *[outputs[i] for i in self._after]], [], [])
