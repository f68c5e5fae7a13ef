"""The explicit map between training names (MeshGPTModel) and Hugging Face names.

    training (megatron-core)                         Hugging Face (GPT-NeoX names)
    embedding.word_embeddings.weight                 gpt_neox.embed_in.weight
    block.prelude.{i}.<layer>                        gpt_neox.layers.{i}.<layer>
    block.core.{j}.<layer>                           gpt_neox.layers.{P + j}.<layer>
    block.coda.{k}.<layer>                           gpt_neox.layers.{P + C' + k}.<layer>
    block.state_passing.write_routers.{s}.*          gpt_neox.mesh.write_routers.{s}.*
    block.state_passing.read_routers.{s}.*           gpt_neox.mesh.read_routers.{s}.*
    block.state_passing.scalars                      gpt_neox.state_scalars
    block.state_passing.step_embedding               gpt_neox.mesh.step_embedding   (mesh_routers: shared)
    block.state_passing.routers.{r}.*                gpt_neox.mor.routers.{r}.*   (MoR, expert choice)
    block.state_passing.router.*                     gpt_neox.mor.router.*        (MoR, token choice)
    block.state_passing.depth_bias                   gpt_neox.mor.depth_bias      (token choice, loss-free)
    final_layernorm.*                                gpt_neox.final_layer_norm.*
    output_layer.weight                              embed_out.weight

Relaxed sharing adds, on core layers only, tensors stacked over the K loop iterations under
the same names on both sides (`...linear_qkv.lora_A` <-> `...attention.query_key_value.lora_A`;
lora_A, lora_B, bias_delta of a linear; weight_delta, bias_delta of a LayerNorm).

C' is the number of core layers held: C when the core is shared, C*K for `vanilla+mesh`
(K distinct blocks). `vanilla` keeps its whole stack in `block.prelude`. Inside a layer:

    input_layernorm / post_attention_layernorm       same names
    self_attention.linear_qkv                        attention.query_key_value
    self_attention.linear_proj                       attention.dense
    mlp.linear_fc1                                   mlp.dense_h_to_4h
    mlp.linear_fc2                                   mlp.dense_4h_to_h

No tensor is permuted: megatron's fused QKV for multi-head attention is per head [q, k, v]
(`[heads, 3, head_dim]` rows), exactly GPT-NeoX's layout. megatron's `_extra_state` entries
(None on the local backend) and rotary `inv_freq` buffers have no counterpart and are
dropped; the writer of a training checkpoint adds `_extra_state` back from a built model.

The second half builds the Hugging Face config of a ModelConfig: transformers' native
GPTNeoXConfig for `vanilla` (loadable without remote code), MeshGPTNeoXConfig otherwise.
"""

from __future__ import annotations

import math
import re
from typing import Optional

import torch
from torch import Tensor

from mesh_megatron.checkpoint.skeleton import is_ignored
from mesh_megatron.config import ConfigError, ModelConfig

# Inside one layer: training suffix prefix -> HF suffix prefix (longest match first is not
# needed: none is a prefix of another).
_LAYER_PARTS: tuple[tuple[str, str], ...] = (
    ("input_layernorm.", "input_layernorm."),
    ("post_attention_layernorm.", "post_attention_layernorm."),
    ("self_attention.linear_qkv.", "attention.query_key_value."),
    ("self_attention.linear_proj.", "attention.dense."),
    ("mlp.linear_fc1.", "mlp.dense_h_to_4h."),
    ("mlp.linear_fc2.", "mlp.dense_4h_to_h."),
)
_TOP_LEVEL: tuple[tuple[str, str], ...] = (
    ("embedding.word_embeddings.weight", "gpt_neox.embed_in.weight"),
    ("final_layernorm.weight", "gpt_neox.final_layer_norm.weight"),
    ("final_layernorm.bias", "gpt_neox.final_layer_norm.bias"),
    ("output_layer.weight", "embed_out.weight"),
    ("block.state_passing.scalars", "gpt_neox.state_scalars"),
    ("block.state_passing.step_embedding", "gpt_neox.mesh.step_embedding"),  # shared MeSH routers
    ("block.injection.adapter.weight", "gpt_neox.injection_adapter.weight"),  # --input-injection concat-adapter
    ("block.state_passing.router.weight", "gpt_neox.mor.router.weight"),  # MoR token choice: Linear(h -> K)
    ("block.state_passing.router.bias", "gpt_neox.mor.router.bias"),
    ("block.state_passing.depth_bias", "gpt_neox.mor.depth_bias"),  # token choice, loss-free balancing
)
_TRAIN_LAYER_RE = re.compile(r"^block\.(prelude|core|coda)\.(\d+)\.(.+)$")
_TRAIN_ROUTER_RE = re.compile(r"^block\.state_passing\.(write_routers|read_routers)\.(\d+)\.(weight|bias)$")
_HF_LAYER_RE = re.compile(r"^gpt_neox\.layers\.(\d+)\.(.+)$")
_HF_ROUTER_RE = re.compile(r"^gpt_neox\.mesh\.(write_routers|read_routers)\.(\d+)\.(weight|bias)$")
_TRAIN_MOR_RE = re.compile(r"^block\.state_passing\.routers\.(\d+)\.(weight|bias)$")
_HF_MOR_RE = re.compile(r"^gpt_neox\.mor\.routers\.(\d+)\.(weight|bias)$")

def stack_sizes(config: ModelConfig) -> tuple[int, int, int]:
    """(prelude, core, coda) layers HELD by the training model: vanilla is all prelude;
    the core holds C layers when shared, C*K when `vanilla+mesh` unrolls it."""
    layout = config.parsed_layout
    if not layout.is_looped:
        return layout.prelude, 0, 0
    core = layout.core if config.core_shared else layout.core * layout.loops
    return layout.prelude, core, layout.coda


def _offsets(config: ModelConfig) -> dict[str, tuple[int, int]]:
    prelude, core, coda = stack_sizes(config)
    return {"prelude": (0, prelude), "core": (prelude, core), "coda": (prelude + core, coda)}


def to_hf_name(name: str, config: ModelConfig) -> Optional[str]:
    """The HF name of a training name; None for non-weights (`_extra_state`, `inv_freq`)."""
    if is_ignored(name):
        return None
    for train, hf in _TOP_LEVEL:
        if name == train:
            return hf
    m = _TRAIN_ROUTER_RE.match(name)
    if m:
        return f"gpt_neox.mesh.{m.group(1)}.{m.group(2)}.{m.group(3)}"
    m = _TRAIN_MOR_RE.match(name)
    if m:
        return f"gpt_neox.mor.routers.{m.group(1)}.{m.group(2)}"
    m = _TRAIN_LAYER_RE.match(name)
    if m:
        stack, index, rest = m.group(1), int(m.group(2)), m.group(3)
        offset, count = _offsets(config)[stack]
        if index >= count:
            raise ConfigError(f"training weight {name} is outside the {stack} of layout {config.layout} "
                              f"({count} layers): the checkpoint does not match its mesh_config.json")
        for train_part, hf_part in _LAYER_PARTS:
            if rest.startswith(train_part):
                return f"gpt_neox.layers.{offset + index}.{hf_part}{rest[len(train_part):]}"
    raise ConfigError(f"training weight {name} has no Hugging Face name: it is not a MeshGPTModel weight")


def from_hf_name(name: str, config: ModelConfig) -> Optional[str]:
    """The training name of an HF name; None for non-weights. `lm_head.weight` (how
    transformers names GPT-NeoX's output layer in memory) is read as `embed_out.weight`."""
    if is_ignored(name):
        return None
    if name == "lm_head.weight":
        name = "embed_out.weight"
    for train, hf in _TOP_LEVEL:
        if name == hf:
            return train
    m = _HF_ROUTER_RE.match(name)
    if m:
        return f"block.state_passing.{m.group(1)}.{m.group(2)}.{m.group(3)}"
    m = _HF_MOR_RE.match(name)
    if m:
        return f"block.state_passing.routers.{m.group(1)}.{m.group(2)}"
    m = _HF_LAYER_RE.match(name)
    if m:
        index, rest = int(m.group(1)), m.group(2)
        for stack, (offset, count) in _offsets(config).items():
            if offset <= index < offset + count:
                for train_part, hf_part in _LAYER_PARTS:
                    if rest.startswith(hf_part):
                        return f"block.{stack}.{index - offset}.{train_part}{rest[len(hf_part):]}"
                break
        else:
            raise ConfigError(f"HF weight {name} is beyond the {sum(stack_sizes(config))} unique layers "
                              f"of layout {config.layout} ({config.variant})")
    raise ConfigError(f"HF weight {name} has no training name: it is not a GPT-NeoX / MeSH weight")


def training_to_hf(state: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Rename a full (TP=1) training state dict to HF names; non-weights are dropped."""
    out = {}
    for name, tensor in state.items():
        hf = to_hf_name(name, config)
        if hf is not None:
            out[hf] = tensor
    return out


def hf_to_training(state: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Rename an HF state dict to training names; non-weights are dropped."""
    out = {}
    for name, tensor in state.items():
        train = from_hf_name(name, config)
        if train is not None:
            out[train] = tensor
    return out


# --------------------------------------------------------------------------------------
# HF configs
# --------------------------------------------------------------------------------------

def fold_embedding_multiplier(state: dict[str, Tensor], multiplier: float,
                              name: str = "gpt_neox.embed_in.weight") -> dict[str, Tensor]:
    """embed_in * multiplier, computed in fp32: exact for the forward pass, since the
    embedding is a lookup and every consumer sees only the scaled rows."""
    if multiplier == 1.0:
        return state
    weight = state[name]
    return {**state, name: (weight.float() * multiplier).to(weight.dtype)}


def hf_config(config: ModelConfig, vocab_rows: int, *, bos_token_id: Optional[int] = None,
              eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
              dtype: Optional[torch.dtype] = None):
    """The Hugging Face config of a training ModelConfig.

    `vocab_rows` is the number of embedding rows in the checkpoint (the PADDED vocabulary,
    which depends on the TP size it was trained with). `vanilla` gets transformers' own
    GPTNeoXConfig; its embedding multiplier is NOT in the config (transformers has none):
    the exporter folds it into embed_in. Every other variant gets MeshGPTNeoXConfig with
    `embedding_multiplier` set and unscaled weights.
    """
    common = dict(
        vocab_size=vocab_rows,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.ffn_size,
        hidden_act="gelu",  # exact erf GELU, as megatron's torch.nn.functional.gelu
        max_position_embeddings=config.seq_length,
        layer_norm_eps=config.layernorm_epsilon,
        use_parallel_residual=True,
        initializer_range=config.weight_init_std,
        tie_word_embeddings=False,
        attention_bias=True,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    if dtype is not None:
        common["dtype"] = dtype
    layout = config.parsed_layout
    if config.variant == "vanilla":
        from transformers import GPTNeoXConfig

        return GPTNeoXConfig(
            **common,
            num_hidden_layers=layout.compute_depth,
            # transformers 5 spells GPT-NeoX's rotary_pct / rotary_emb_base this way
            rope_parameters={"rope_type": "default", "rope_theta": float(config.rotary_base),
                             "partial_rotary_factor": float(config.rotary_percent)},
            hidden_dropout=config.hidden_dropout,
            attention_dropout=config.attention_dropout,
        )
    from mesh_megatron.hf import MeshGPTNeoXConfig

    return MeshGPTNeoXConfig(
        **common,
        rotary_pct=config.rotary_percent,
        rotary_emb_base=config.rotary_base,
        num_prelude_layers=layout.prelude,
        num_core_layers=layout.core,
        num_loops=layout.loops,
        num_coda_layers=layout.coda,
        core_shared=config.core_shared,
        state_passing=config.variant,
        mesh_slots=config.slots if config.is_mesh else None,
        mesh_router_init=config.mesh_router_init,
        mesh_router_margin=config.mesh_router_margin,
        mesh_routers=config.mesh_routers,
        mesh_step_embedding=config.mesh_step_embedding,
        input_injection=config.input_injection,
        state_init=config.state_init,
        embedding_multiplier=config.embedding_multiplier,
        lora_rank=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_targets=config.lora_targets,
        relax_biases=config.relax_biases,
        relax_norms=config.relax_norms,
        **(dict(mor_routing=config.mor_routing,
                mor_capacities=None if config.is_token_choice else list(config.capacities),
                mor_alpha=config.gate_alpha, mor_kv=config.mor_kv,
                **({"mor_bias_rate": config.mor_bias_rate} if config.mor_bias_rate is not None else {}))
           if config.is_mor else {}),
    )


def vocab_divisor(rows: int, tensor_parallel_size: int = 1) -> int:
    """The largest make_vocab_size_divisible_by (a power of two, at most megatron's 128) for
    which `rows` embedding rows need no padding at this TP size: an imported model keeps its
    exact row count."""
    for divisor in (128, 64, 32, 16, 8, 4, 2, 1):
        if rows % (divisor * tensor_parallel_size) == 0:
            return divisor
    raise ConfigError(f"{rows} vocabulary rows cannot be split evenly over tensor-parallel size "
                      f"{tensor_parallel_size}: import at a TP size that divides {rows}")


def scale_embeddings_for(multiplier: float, hidden_size: int) -> Optional[bool]:
    """scale_embeddings that reproduces an HF embedding_multiplier, or None when neither
    1 nor sqrt(hidden) does (the importer then folds it into the embedding)."""
    if math.isclose(multiplier, 1.0, rel_tol=0, abs_tol=0):
        return False
    if math.isclose(multiplier, math.sqrt(hidden_size), rel_tol=1e-12):
        return True
    return None
