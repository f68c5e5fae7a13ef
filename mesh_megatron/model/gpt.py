"""MeshGPTModel: embedding (x sqrt(d)) -> recursive block -> final norm -> output layer.

Input tokens are `[b, s]`; inside, megatron-core's `[s, b, h]` layout is used throughout.
With labels the model returns per-token losses `[b, s]` (vocab-parallel cross entropy);
without, logits `[b, s, v / tp]` (this rank's vocabulary shard).

Under pipeline parallelism the model is one stage (`stage`, from parallel/pipeline_layout):
the first stage embeds, the last normalises and projects; a middle stage's input arrives
through `set_input_tensor` (megatron-core's schedules call it) and its output is sent on.
What crosses a boundary is the hidden state `[s, b, h]`, or `[2s, b, h]` = [h; h_emb]
stacked along the sequence while a later stage's core still needs the embeddings (MeSH
slot 0, anchor_emb). Stacking on the sequence keeps the hidden width the schedule's
tensor shape assumes, which the interleaved schedule cannot change.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from mesh_megatron.config import ExecutionConfig, ModelConfig, RecurrenceConfig
from mesh_megatron.model.initialization import initialize_parameters, tag_tensor_parallel_weights
from mesh_megatron.model.attention import backend_provider
from mesh_megatron.model.compilation import compile_layers
from mesh_megatron.model.layer_spec import neox_layer_spec
from mesh_megatron.model.recursive_block import RecursiveBlock, StateObserver


class MeshGPTModel(MegatronModule):
    def __init__(self, config: ModelConfig, tf_config: TransformerConfig,
                 execution: Optional[ExecutionConfig] = None, stage=None, init_seed: Optional[int] = None,
                 recurrence: Optional[RecurrenceConfig] = None):
        """`execution`: attention backend, activation recompute, torch.compile (default: auto, none, off).
        `stage`: a pipeline_layout.Stage (which pieces live here); None = the whole model.
        `init_seed`: weights drawn per parameter name (model/initialization.py), so they do not
        depend on TP or PP; None draws the seed from torch's global generator.
        `recurrence`: loop iterations per training forward (model/recurrence.py; None: K)."""
        super().__init__(config=tf_config)
        draw_weights = tf_config.perform_initialization
        # megatron's layers would draw every weight too, only for initialize_parameters to
        # overwrite it: build them without their init (tags are added below instead).
        tf_config = dataclasses.replace(tf_config, perform_initialization=False)
        execution = execution or ExecutionConfig()
        execution.validate()
        backend = backend_provider(execution.attention_backend)
        self.model_config = config
        self.padded_vocab_size = config.padded_vocab_size(tf_config.tensor_model_parallel_size)
        self.embedding_multiplier = config.embedding_multiplier
        self.pre_process = stage is None or stage.pre_process
        self.post_process = stage is None or stage.post_process
        self.receives_embeddings = stage is not None and stage.receives_embeddings
        self.sends_embeddings = stage is not None and stage.sends_embeddings
        self.input_tensor: Optional[Tensor] = None
        self.model_type = ModelType.encoder_or_decoder  # read by megatron-core's schedules

        if self.pre_process:
            # Word embeddings only: positions come from rotary inside attention.
            self.embedding = LanguageModelEmbedding(
                config=tf_config, vocab_size=self.padded_vocab_size,
                max_sequence_length=config.seq_length, position_embedding_type="rope",
            )
        self.rotary_pos_emb = RotaryEmbedding(
            kv_channels=config.head_dim, rotary_percent=config.rotary_percent,
            rotary_base=config.rotary_base, use_cpu_initialization=tf_config.use_cpu_initialization,
        )
        self.block = RecursiveBlock(
            config, tf_config, neox_layer_spec(backend),
            prelude=None if stage is None else stage.prelude,
            has_core=stage is None or stage.core,
            coda=None if stage is None else stage.coda, recompute=execution.recompute, recurrence=recurrence,
        )
        if self.post_process:
            self.final_layernorm = build_module(
                backend.layer_norm(rms_norm=False, for_qk=False), config=tf_config,
                hidden_size=config.hidden_size, eps=config.layernorm_epsilon,
            )
            # Untied output layer, no bias (as GPT-NeoX's embed_out); vocab split across TP.
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size, self.padded_vocab_size, config=tf_config,
                init_method=tf_config.init_method, bias=False, skip_bias_add=False, gather_output=False,
            )
        if execution.compile:
            compile_layers(self.block)
        tag_tensor_parallel_weights(self)
        if draw_weights:
            from megatron.core import parallel_state

            seed = init_seed if init_seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
            initialize_parameters(self, config, seed, parallel_state.get_tensor_model_parallel_rank(),
                                  tf_config.tensor_model_parallel_size)

    def set_input_tensor(self, input_tensor) -> None:
        """Called by megatron-core's pipeline schedules with the previous stage's output."""
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, (list, tuple)) else input_tensor

    def embed(self, input_ids: Tensor) -> Tensor:
        """[b, s] token ids -> h_emb [s, b, h], scaled by sqrt(hidden) when configured."""
        h = self.embedding(input_ids=input_ids, position_ids=None)
        return h * self.embedding_multiplier if self.embedding_multiplier != 1.0 else h

    def forward(self, input_ids: Tensor, labels: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None,
                observe: Optional[StateObserver] = None, recurrence_key: Optional[tuple[int, int]] = None) -> Tensor:
        """`recurrence_key`: (iteration, micro-batch index) of a training forward, from which a
        random recurrence draws its loop count (model/recurrence.py); ignored otherwise."""
        if self.pre_process:
            h_emb = self.embed(input_ids)
            hidden = h_emb
            if observe:
                observe("h_emb", h_emb)
        elif self.receives_embeddings:
            hidden, h_emb = self.input_tensor.chunk(2, dim=0)  # [2s, b, h] -> 2 x [s, b, h]
        else:
            hidden, h_emb = self.input_tensor, None
        rotary = self.rotary_pos_emb(input_ids.shape[1])  # [s, 1, 1, rotary_dims]
        h = self.block(hidden, h_emb, rotary, attention_mask, observe=observe, recurrence_key=recurrence_key)
        if not self.post_process:
            return torch.cat([h, h_emb], dim=0) if self.sends_embeddings else h
        if observe:
            observe("h_out", h)
        h = self.final_layernorm(h)
        logits, _ = self.output_layer(h)  # [s, b, v / tp]
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        # Cross entropy over the split vocabulary, in fp32: [s, b] -> [b, s].
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.transpose(0, 1).contiguous())
        return loss.transpose(0, 1).contiguous()
