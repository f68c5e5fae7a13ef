"""MeshGPTModel: embedding (x sqrt(d)) -> recursive block -> final norm -> output layer.

Input tokens are `[b, s]`; inside, megatron-core's `[s, b, h]` layout is used throughout.
With labels the model returns per-token losses `[b, s]` (vocab-parallel cross entropy);
without, logits `[b, s, v / tp]` (this rank's vocabulary shard).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.models.backends import BackendSpecProvider
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from mesh_megatron.config import ModelConfig
from mesh_megatron.model.layer_spec import default_backend, neox_layer_spec
from mesh_megatron.model.recursive_block import RecursiveBlock, StateObserver


class MeshGPTModel(MegatronModule):
    def __init__(self, config: ModelConfig, tf_config: TransformerConfig,
                 backend: Optional[BackendSpecProvider] = None):
        super().__init__(config=tf_config)
        backend = backend or default_backend()
        self.model_config = config
        self.padded_vocab_size = config.padded_vocab_size(tf_config.tensor_model_parallel_size)
        self.embedding_multiplier = config.embedding_multiplier

        # Word embeddings only: positions come from rotary inside attention.
        self.embedding = LanguageModelEmbedding(
            config=tf_config, vocab_size=self.padded_vocab_size,
            max_sequence_length=config.seq_length, position_embedding_type="rope",
        )
        self.rotary_pos_emb = RotaryEmbedding(
            kv_channels=config.head_dim, rotary_percent=config.rotary_percent,
            rotary_base=config.rotary_base, use_cpu_initialization=tf_config.use_cpu_initialization,
        )
        self.block = RecursiveBlock(config, tf_config, neox_layer_spec(backend))
        self.final_layernorm = build_module(
            backend.layer_norm(rms_norm=False, for_qk=False), config=tf_config,
            hidden_size=config.hidden_size, eps=config.layernorm_epsilon,
        )
        # Untied output layer, no bias (as GPT-NeoX's embed_out); vocab split across TP.
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, self.padded_vocab_size, config=tf_config,
            init_method=tf_config.init_method, bias=False, skip_bias_add=False, gather_output=False,
        )

    def embed(self, input_ids: Tensor) -> Tensor:
        """[b, s] token ids -> h_emb [s, b, h], scaled by sqrt(hidden) when configured."""
        h = self.embedding(input_ids=input_ids, position_ids=None)
        return h * self.embedding_multiplier if self.embedding_multiplier != 1.0 else h

    def forward(self, input_ids: Tensor, labels: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None,
                observe: Optional[StateObserver] = None) -> Tensor:
        h_emb = self.embed(input_ids)
        if observe:
            observe("h_emb", h_emb)
        rotary = self.rotary_pos_emb(input_ids.shape[1])  # [s, 1, 1, rotary_dims]
        h = self.block(h_emb, rotary, attention_mask, observe=observe)
        if observe:
            observe("h_out", h)
        h = self.final_layernorm(h)
        logits, _ = self.output_layer(h)  # [s, b, v / tp]
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        # Cross entropy over the split vocabulary, in fp32: [s, b] -> [b, s].
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.transpose(0, 1).contiguous())
        return loss.transpose(0, 1).contiguous()


