"""prelude -> core x K -> coda, with the state passing between iterations.

    h_pre = prelude(h_emb)
    h0, carry = start(h_emb, h_pre)            # MeSH: transitional write/read
    for t in 0..K-1:
        y = core(h_t)                           # the same weights every iteration
        h_{t+1}, carry = step(t, h_t, y, carry)
    out = coda(h_K)

`vanilla` is a plain stack held in `prelude`. `vanilla+mesh` keeps K *distinct* core
blocks (`core` then holds C*K layers, block t = layers t*C .. t*C+C-1) with the MeSH
buffer between them. Layer numbers (1-based, as megatron counts) follow unique layers:
prelude, core, coda, the same order the export uses.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor, nn

from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from mesh_megatron.config import ModelConfig
from mesh_megatron.model.state_passing import build_state_passing

# Observer of block states for diagnostics: called with (name, state [s, b, h]).
StateObserver = Callable[[str, Tensor], None]


class RecursiveBlock(MegatronModule):
    def __init__(self, config: ModelConfig, tf_config: TransformerConfig, layer_spec: ModuleSpec):
        super().__init__(config=tf_config)
        self.model_config = config
        layout = config.parsed_layout
        self.loops = layout.loops
        self.core_layers = layout.core
        n_core = layout.core * (1 if config.core_shared else layout.loops)
        counts = (layout.prelude, n_core, layout.coda)
        offsets = (0, counts[0], counts[0] + counts[1])

        def stack(count: int, offset: int) -> nn.ModuleList:
            return nn.ModuleList(
                build_module(layer_spec, config=tf_config, layer_number=offset + i + 1) for i in range(count)
            )

        self.prelude = stack(counts[0], offsets[0])
        self.core = stack(counts[1], offsets[1])
        self.coda = stack(counts[2], offsets[2])
        self.state_passing = build_state_passing(config) if layout.is_looped else None

    def core_block(self, t: int) -> nn.ModuleList:
        """The layers applied in iteration t: the shared core, or block t when unshared."""
        if self.model_config.core_shared:
            return self.core
        return self.core[t * self.core_layers:(t + 1) * self.core_layers]

    @staticmethod
    def _run(layers, h: Tensor, rotary_pos_emb: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
        for layer in layers:
            h = layer(h, rotary_pos_emb, attention_mask)
        return h

    def forward(self, h_emb: Tensor, rotary_pos_emb: Tensor, attention_mask: Optional[Tensor] = None,
                observe: Optional[StateObserver] = None) -> Tensor:
        # h_emb: [s, b, h] scaled token embeddings.
        h = self._run(self.prelude, h_emb, rotary_pos_emb, attention_mask)
        if self.state_passing is not None:
            if observe:
                observe("h_pre", h)
            h, carry = self.state_passing.start(h_emb, h)
            if observe:
                observe("h0", h)
            for t in range(self.loops):
                y = self._run(self.core_block(t), h, rotary_pos_emb, attention_mask)
                h, carry = self.state_passing.step(t, h, y, carry)
                if observe:
                    observe(f"h{t + 1}", h)
        return self._run(self.coda, h, rotary_pos_emb, attention_mask)
