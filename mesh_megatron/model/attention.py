"""Core attention backends: which kernel computes softmax(q k^T / sqrt(d)) v.

megatron-core's SelfAttention projects q, k, v, applies rotary, and hands the core
attention `[s, b, heads/tp, d]` tensors; the core returns `[s, b, heads/tp * d]`. Three
cores fit that slot through the layer's ModuleSpec (model/layer_spec.py), so a kernel is
swapped without forking the layer:

    local  megatron's DotProductAttention: materialises the [b, heads, s, s] scores
           (the reference; at s = 4096 it is the memory wall)
    sdpa   torch.nn.functional.scaled_dot_product_attention(is_causal=True): flash /
           memory-efficient / cuDNN kernels on GPU, a fused kernel on CPU; never stores s x s
    te     Transformer Engine's fused attention, when importable on a GPU

`auto` picks te when Transformer Engine imports on a GPU machine, sdpa otherwise. All three
compute the same math; checkpoints and the HF export do not depend on the choice.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from mesh_megatron.config import ConfigError


class SDPAttention(MegatronModule):
    """Causal attention through torch's `scaled_dot_product_attention`.

    Same constructor as megatron's DotProductAttention (SelfAttention builds either), same
    `[s, b, np, hn]` in and `[s, b, np * hn]` out. Attention dropout draws from megatron's
    tracked RNG, as the local core does, so recompute and TP reproduce it.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str = "self", attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None, **_unused):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ConfigError("the sdpa attention backend does not support context parallelism: "
                              "use --attention-backend te")
        if attn_mask_type != AttnMaskType.causal:
            raise ConfigError(f"the sdpa attention backend is causal only, got {attn_mask_type}")
        head_dim = config.kv_channels
        # megatron's apply_query_key_layer_scaling divides by layer_number and multiplies it
        # back inside the softmax: the net scale is 1/sqrt(d) either way.
        self.softmax_scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias: Optional[Tensor] = None,
                packed_seq_params=None) -> Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("sdpa attention: packed sequences and attention bias are not supported")
        s, b, np_, hn = query.shape
        # [s, b, np, hn] -> [b, np, s, hn]: sdpa's layout (a view; the kernels take strides).
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if k.shape[1] != np_:  # grouped-query attention: repeat the kv heads
            k = k.repeat_interleave(np_ // k.shape[1], dim=1)
            v = v.repeat_interleave(np_ // v.shape[1], dim=1)
        mask, causal = None, True
        if attention_mask is not None:
            # megatron's masks are True where attention is *forbidden*; sdpa wants allowed.
            # The causal triangle is added explicitly because sdpa refuses both at once.
            causal_mask = torch.ones(s, k.shape[2], dtype=torch.bool, device=q.device).tril()
            mask, causal = ~attention_mask & causal_mask, False
        dropout = self.dropout_p if self.training else 0.0
        if dropout > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                     is_causal=causal, scale=self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=causal, scale=self.softmax_scale)
        # [b, np, s, hn] -> [s, b, np * hn]
        return out.permute(2, 0, 1, 3).reshape(s, b, np_ * hn)


class SDPASpecProvider(LocalSpecProvider):
    """megatron's local layers (TP linears, norms) with the sdpa core attention."""

    def core_attention(self) -> type:
        return SDPAttention


def transformer_engine_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_attention_backend(name: str) -> str:
    """`auto` -> `te` or `sdpa`; `te` without Transformer Engine on a GPU is a clear error."""
    if name == "auto":
        return "te" if transformer_engine_available() else "sdpa"
    if name == "te" and not transformer_engine_available():
        raise ConfigError("--attention-backend te needs Transformer Engine importable on a GPU machine: "
                          "install transformer-engine, or use --attention-backend sdpa")
    return name


def core_attention_names(model: torch.nn.Module) -> list[str]:
    """Class names of the core attention the model's layers really hold (sorted, distinct):
    what a backend name resolved to, for logs and tests (DotProductAttention is `local`)."""
    from megatron.core.transformer.attention import Attention

    return sorted({type(m.core_attention).__name__ for m in model.modules() if isinstance(m, Attention)})


def backend_provider(name: str) -> BackendSpecProvider:
    """The layer spec provider for an attention backend name (auto/te/sdpa/local)."""
    name = resolve_attention_backend(name)
    if name == "te":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    if name == "sdpa":
        return SDPASpecProvider()
    return LocalSpecProvider()
