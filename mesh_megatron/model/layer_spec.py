"""The GPT-NeoX (Pythia) layer as a megatron-core ModuleSpec.

    out = x + dropout(attn(ln1(x))) + dropout(mlp(ln2(x)))        # parallel residual

megatron-core's TransformerLayer is sequential (x -> x + attn -> x + mlp), so the layer
class here is ours, and everything inside it comes from megatron-core through the spec:
SelfAttention (rotary, causal core attention), MLP, tensor-parallel linears and norms.
Swap a kernel by swapping the backend (model/attention.py: megatron's local layers with
torch sdpa or megatron's reference attention, or Transformer Engine on GPU) without
forking the layer.

Names mirror the Hugging Face export (`input_layernorm`, `post_attention_layernorm`),
so the key map stays short.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from megatron.core.models.backends import BackendSpecProvider
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig


@dataclass
class NeoXLayerSubmodules:
    input_layernorm: Union[ModuleSpec, type]
    self_attention: Union[ModuleSpec, type]
    post_attention_layernorm: Union[ModuleSpec, type]
    mlp: Union[ModuleSpec, type]


class NeoXLayer(MegatronModule):
    """One GPT-NeoX block; hidden states are `[s, b, h]` as everywhere in megatron-core."""

    def __init__(self, config: TransformerConfig, submodules: NeoXLayerSubmodules, layer_number: int):
        super().__init__(config=config)
        self.layer_number = layer_number
        h, eps = config.hidden_size, config.layernorm_epsilon
        self.input_layernorm = build_module(submodules.input_layernorm, config=config, hidden_size=h, eps=eps)
        self.self_attention = build_module(submodules.self_attention, config=config, layer_number=layer_number)
        self.post_attention_layernorm = build_module(
            submodules.post_attention_layernorm, config=config, hidden_size=h, eps=eps
        )
        self.mlp = build_module(submodules.mlp, config=config)

    def _branch(self, out_and_bias: tuple[Tensor, Optional[Tensor]]) -> Tensor:
        # megatron's row-parallel linears return (output, bias) so the bias add can be fused;
        # here it is added explicitly, then the branch's dropout (GPT-NeoX drops each branch).
        out, bias = out_and_bias
        if bias is not None:
            out = out + bias
        return torch.nn.functional.dropout(out, p=self.config.hidden_dropout, training=self.training)

    def forward(self, hidden_states: Tensor, rotary_pos_emb: Tensor,
                attention_mask: Optional[Tensor] = None) -> Tensor:
        # hidden_states: [s, b, h]; rotary_pos_emb: [s, 1, 1, rotary_dims]
        attn = self._branch(self.self_attention(
            self.input_layernorm(hidden_states), attention_mask=attention_mask,
            rotary_pos_emb=rotary_pos_emb,
        ))
        mlp = self._branch(self.mlp(self.post_attention_layernorm(hidden_states)))
        return hidden_states + attn + mlp


def neox_layer_spec(backend: BackendSpecProvider) -> ModuleSpec:
    """ModuleSpec of the GPT-NeoX layer for a backend (model/attention.backend_provider).

    Layer norms stay separate modules (not fused into the following linear) so the
    parameter names are the same on every backend and checkpoints move between them.
    """
    norm = backend.layer_norm(rms_norm=False, for_qk=False)
    return ModuleSpec(
        module=NeoXLayer,
        submodules=NeoXLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=backend.column_parallel_linear(),
                    core_attention=backend.core_attention(),
                    linear_proj=backend.row_parallel_linear(),
                ),
            ),
            post_attention_layernorm=norm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=backend.column_parallel_linear(),
                    linear_fc2=backend.row_parallel_linear(),
                ),
            ),
        ),
    )
