"""Hugging Face model of an exported MeSH recursive GPT-NeoX (arXiv 2510.07739), pure PyTorch + transformers.

The math contract is docs/MESH_METHOD.md. In one picture, for the layout P+CrK+Q:

    h_emb = embed_in(ids) * embedding_multiplier
    h_pre = prelude(h_emb)                                   # P layers
    h0    = h_pre, or the MeSH transitional read             # see MeshRouters.step
    h_{t+1} = state passing of core(h_t), t = 0..K-1         # see MeshGPTNeoXModel._next_state
    logits = embed_out(final_layer_norm(coda(h_K)))          # Q layers

Every layer is a GPT-NeoX (Pythia) block and the weight names are GPT-NeoX's, so a prelude/core/coda
checkpoint reads like a Pythia one with fewer layers plus the MeSH routers (`gpt_neox.mesh.*`) and the
`learned` scalars (`gpt_neox.state_scalars`).

This file is copied next to exported weights and loaded with `trust_remote_code=True`: it imports only
torch and transformers, plus its sibling configuration_mesh.py.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import can_return_tuple

from .configuration_mesh import MESH_VARIANTS, MeshGPTNeoXConfig

# -----------------------------------------------------------------------------
# GPT-NeoX block: rotary attention + GELU MLP, parallel residual


def rotary_cos_sin(config, position_ids, dtype):
    """cos/sin tables for GPT-NeoX rotary: [batch, seq, rotary_ndims], the frequencies repeated twice (rotate_half).

    Computed per call instead of kept in a buffer: it is a few hundred numbers, and a non-persistent buffer would
    have to be rebuilt by hand after transformers materialises the model from the meta device.
    """
    head_dim = config.hidden_size // config.num_attention_heads
    dim = int(head_dim * config.rotary_pct)
    inv_freq = 1.0 / (config.rotary_emb_base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))  # [dim/2]
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # [batch, seq, dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [batch, seq, dim]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):
    """Rotate the first cos.shape[-1] dims of each head of x [batch, heads, seq, head_dim]; pass the rest."""
    rot_dim = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [batch, 1, seq, rot_dim], broadcast over heads
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain softmax attention for config._attn_implementation == "eager". q/k/v: [batch, heads, seq, head_dim]."""
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # [batch, heads, q_len, kv_len]
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask  # additive float mask from create_causal_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()  # [batch, q_len, heads, head_dim]
    return attn_output, attn_weights


def plain_linear(name, in_features, out_features, bias=True):
    return nn.Linear(in_features, out_features, bias=bias)


class MeshGPTNeoXAttention(nn.Module):
    is_causal = True

    def __init__(self, config, linear=plain_linear):
        super().__init__()
        self.config = config  # the attention interfaces read config._attn_implementation from the module
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        h = config.hidden_size
        self.query_key_value = linear("query_key_value", h, 3 * h, bias=config.attention_bias)
        self.dense = linear("dense", h, h, bias=config.attention_bias)

    def forward(self, x, attention_mask, position_embeddings, cache=None, cache_idx=None, kv_share=None, **kwargs):
        batch, seq, _ = x.shape
        # GPT-NeoX layout: the fused output is [heads, 3, head_dim] per token (q, k, v interleaved per head)
        qkv = self.query_key_value(x).view(batch, seq, -1, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)  # each [batch, heads, seq, head_dim]
        cos, sin = position_embeddings
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_share is not None and kv_share[2]:  # MoR share-first, a later recursion: the first one's k, v
            k, v = kv_share[0][kv_share[1]]
        elif cache is not None:
            # cache_idx is the index of this layer APPLICATION, not of the layer: a shared core layer run K times
            # keeps K separate key/value histories
            k, v = cache.update(k, v, cache_idx)  # [batch, heads, past + seq, head_dim]
        if kv_share is not None and not kv_share[2]:
            kv_share[0][kv_share[1]] = (k, v)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, _ = attention(self, q, k, v, attention_mask, scaling=self.scaling, dropout=0.0, **kwargs)
        return self.dense(out.reshape(batch, seq, -1))


class MeshGPTNeoXMLP(nn.Module):
    def __init__(self, config, linear=plain_linear):
        super().__init__()
        self.dense_h_to_4h = linear("dense_h_to_4h", config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.dense_4h_to_h = linear("dense_4h_to_h", config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class MeshGPTNeoXLayer(GradientCheckpointingLayer):
    def __init__(self, config, relaxed=False):
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        # a relaxed core layer (section below): its linears / norms add loop step t's own tensors
        self.step = LoopStep() if relaxed else None
        linear = RelaxedLinear.factory(config, self.step) if relaxed else plain_linear
        norm = RelaxedLayerNorm if relaxed and config.relax_norms else nn.LayerNorm
        norm_args = dict(loops=config.num_loops, step=self.step) if norm is RelaxedLayerNorm else {}
        self.input_layernorm = norm(config.hidden_size, eps=config.layer_norm_eps, **norm_args)
        self.post_attention_layernorm = norm(config.hidden_size, eps=config.layer_norm_eps, **norm_args)
        self.attention = MeshGPTNeoXAttention(config, linear)
        self.mlp = MeshGPTNeoXMLP(config, linear)

    def forward(self, x, attention_mask=None, position_embeddings=None, cache=None, cache_idx=None, loop=None,
                **kwargs):
        # x: [batch, seq, hidden]; passed positionally so gradient checkpointing sees it as an input.
        # loop: the loop step of a core layer; set here, inside what gradient checkpointing reruns
        if self.step is not None:
            self.step.t = loop
        attn = self.attention(self.input_layernorm(x), attention_mask, position_embeddings, cache, cache_idx, **kwargs)
        if self.use_parallel_residual:  # Pythia: x + attn(ln1(x)) + mlp(ln2(x))
            return x + attn + self.mlp(self.post_attention_layernorm(x))
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


# -----------------------------------------------------------------------------
# Relaxed sharing (arXiv 2410.20672): at loop step t a core linear computes W x + b + db_t + s * B_t A_t x and a
# core LayerNorm LN(x) + norm(x) * dw_t + db_t. The per-step tensors are stacked over the K steps under the
# training names (lora_A [K, r, in], lora_B [K, out, r], bias_delta [K, out], weight_delta [K, hidden]); s is
# lora_alpha / lora_rank. A looped model cannot merge them into one weight per layer, so they stay explicit.


class LoopStep:
    """The loop step a relaxed core layer is computing, set by the layer's forward."""

    t = None


class RelaxedLinear(nn.Linear):
    def __init__(self, in_features, out_features, bias, loops, rank, scale, relax_bias, step):
        super().__init__(in_features, out_features, bias=bias)
        self.step, self.scale = step, scale
        self.lora_A = nn.Parameter(torch.empty(loops, rank, in_features)) if rank else None
        self.lora_B = nn.Parameter(torch.empty(loops, out_features, rank)) if rank else None
        self.bias_delta = nn.Parameter(torch.empty(loops, out_features)) if relax_bias else None

    @staticmethod
    def factory(config, step):
        targets = set(config.lora_targets.split(",")) if config.lora_rank else set()
        scale = (config.lora_alpha or config.lora_rank) / config.lora_rank if config.lora_rank else 0.0

        def linear(name, in_features, out_features, bias=True):
            rank = config.lora_rank if name in targets else 0
            if not rank and not config.relax_biases:
                return nn.Linear(in_features, out_features, bias=bias)
            return RelaxedLinear(in_features, out_features, bias, config.num_loops, rank, scale,
                                 config.relax_biases, step)

        return linear

    def forward(self, x):
        y, t = super().forward(x), self.step.t
        if self.lora_A is not None:
            y = y + F.linear(F.linear(x, self.lora_A[t]), self.lora_B[t]) * self.scale
        if self.bias_delta is not None:
            y = y + self.bias_delta[t]
        return y


class RelaxedLayerNorm(nn.LayerNorm):
    def __init__(self, hidden_size, eps, loops, step):
        super().__init__(hidden_size, eps=eps)
        self.step = step
        self.weight_delta = nn.Parameter(torch.empty(loops, hidden_size))
        self.bias_delta = nn.Parameter(torch.empty(loops, hidden_size))

    def forward(self, x):
        t = self.step.t
        normed = F.layer_norm(x, self.normalized_shape, eps=self.eps)
        return super().forward(x) + normed * self.weight_delta[t] + self.bias_delta[t]


# -----------------------------------------------------------------------------
# MeSH: a buffer of B slots written and read through per-step softmax routers


class MeshRouter(nn.Module):
    """Linear(hidden -> B, bias) + softmax over the B slots, per token.

    Its own module (not nn.Linear) so that `_init_weights` gives it the router init, not the linear one.
    """

    def __init__(self, hidden_size, num_slots):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_slots, hidden_size))  # [B, hidden]
        self.bias = nn.Parameter(torch.empty(num_slots))  # [B]

    def forward(self, h):
        logits = F.linear(h, self.weight, self.bias)  # [batch, seq, B]
        return F.softmax(logits.float(), dim=-1).to(h.dtype)  # softmax in fp32 (MESH_METHOD.md section 3)


class MeshRouters(nn.Module):
    """The K + 1 write and read routers: step s = 0 is the transitional step, s = t + 1 is loop step t.

    mesh_routers "shared": pair 0 for the transitional step and pair 1 for every loop step (any depth), their
    input plus step_embedding[min(t, B - 1)] when mesh_step_embedding is on.
    """

    def __init__(self, config):
        super().__init__()
        self.shared = getattr(config, "mesh_routers", "per-step") == "shared"
        steps, hidden, slots = 2 if self.shared else config.num_loops + 1, config.hidden_size, config.mesh_slots
        self.write_routers = nn.ModuleList(MeshRouter(hidden, slots) for _ in range(steps))
        self.read_routers = nn.ModuleList(MeshRouter(hidden, slots) for _ in range(steps))
        embed = self.shared and getattr(config, "mesh_step_embedding", False)
        self.step_embedding = nn.Parameter(torch.zeros(slots, hidden)) if embed else None  # [B, hidden]

    def step(self, s, buffer, router_input, new_state):
        """One MeSH step: route from router_input, add new_state to every slot by its write weight, read.

        buffer: [batch, seq, hidden, B]; returns (buffer, read [batch, seq, hidden]). The write comes first, so
        the read already sees new_state.
        """
        if self.shared:
            if s and self.step_embedding is not None:
                router_input = router_input + self.step_embedding[min(s - 1, self.step_embedding.shape[0] - 1)]
            s = min(s, 1)
        w = self.write_routers[s](router_input)  # [batch, seq, B]
        r = self.read_routers[s](router_input)  # [batch, seq, B]
        buffer = buffer + new_state.unsqueeze(-1) * w.unsqueeze(-2)  # m_b += w_b * new_state (additive)
        read = (buffer * r.unsqueeze(-2)).sum(-1)  # sum_b r_b * m_b
        return buffer, read


# -----------------------------------------------------------------------------
# Mixture-of-Recursions (arXiv 2507.10524), expert choice: at recursion r a router scores the tokens still active,
# gate g = alpha * sigmoid(logit); the processed tokens get h + g * core(h) (the paper's eq. 2.1), the others keep
# h, and a token not processed at r is never processed later. Which tokens (config.mor_inference):
#   top-k      training's rule: the top int(capacity_r * seq) active tokens per sequence (ties: lower position),
#              gathered in causal order with their own rotary positions, attention among them only. It looks at
#              the whole sequence, so it is not causal: no KV cache.
#   threshold  causal: sigmoid(logit) > mor_threshold (the auxiliary loss trained the router to predict its
#              top-k). Every token runs through the core, masked: with mor_kv "recursion" a query at recursion
#              r sees only the keys of tokens processed at r (recursion-wise caching; the cache keeps which), with
#              "share-first" every recursion reads recursion 0's keys and values of all tokens (KV sharing).
# Token choice (mor_routing "token-choice", mor_token_choice_loop): one router over the depths reads h0; causal as
# it stands, so a plain forward and generation run the same masked loop, with either KV mode.


class MoRRouter(nn.Module):
    """Linear(hidden -> 1, bias); its own module so `_init_weights` gives it the router init."""

    def __init__(self, hidden_size):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, hidden_size))
        self.bias = nn.Parameter(torch.empty(1))

    def forward(self, h):
        return F.linear(h, self.weight, self.bias).squeeze(-1).float()  # [batch, seq] logits in fp32


class MoRDepthRouter(MoRRouter):
    """Token choice: Linear(hidden -> num_loops, bias), logits over the depths [batch, seq, K] in fp32."""

    def __init__(self, hidden_size, loops):
        nn.Module.__init__(self)
        self.weight = nn.Parameter(torch.empty(loops, hidden_size))
        self.bias = nn.Parameter(torch.empty(loops))

    def forward(self, h):
        return F.linear(h, self.weight, self.bias).float()


class MoRRouters(nn.Module):
    def __init__(self, config):
        super().__init__()
        token_choice = getattr(config, "mor_routing", "expert-choice") == "token-choice"
        self.routers = nn.ModuleList(MoRRouter(config.hidden_size) for _ in range(0 if token_choice else config.num_loops))
        self.router = MoRDepthRouter(config.hidden_size, config.num_loops) if token_choice else None
        if token_choice and getattr(config, "mor_bias_rate", None) is not None:  # loss-free balancing's bias
            self.register_buffer("depth_bias", torch.zeros(config.num_loops))
        else:
            self.depth_bias = None
        self.last = []  # the last forward's (logits, processed, active) [batch, seq] per recursion (the probe's)
        self.depth = None  # token choice: the last forward's depths [batch, seq] (0-based)
        self.probs = None  # token choice: the last forward's router probabilities [batch, seq, K] (the probe's)

    def capacities(self, config):
        if config.mor_capacities is not None:
            return list(config.mor_capacities)
        return [(config.num_loops - r) / config.num_loops for r in range(config.num_loops)]


def mor_mask(allowed, dtype):
    """Additive float mask [batch, 1, q, kv] from a boolean one (eager adds it; sdpa takes it as a bias)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def mor_top_k_loop(model, h, run, position_ids, states):
    """Training's routing over the whole sequence (model/mor.py): gather, run, scatter-add. `run(layers, h, first,
    ...)` uses cache entries first, first + 1, ...: recursion t's core layers are entries P + t*C + j."""
    cfg, mor = model.config, model.mor
    first, C = cfg.num_prelude_layers, cfg.num_core_layers
    batch, seq, hidden = h.shape
    active = None
    positions = position_ids.expand(batch, -1)
    mor.last = []
    for t, capacity in enumerate(mor.capacities(cfg)):
        logits = mor.routers[t](h)  # [batch, seq]
        gate = cfg.mor_alpha * torch.sigmoid(logits)
        scores = gate.detach() if active is None else gate.detach().masked_fill(~active, float("-inf"))
        k = max(1, int(capacity * seq))
        index = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k].sort(dim=1).values  # [b, k]
        x = h.gather(1, index[..., None].expand(-1, -1, hidden))
        rope = rotary_cos_sin(cfg, positions.gather(1, index), h.dtype)
        causal = torch.ones(k, k, dtype=torch.bool, device=h.device).tril()[None, None].expand(batch, 1, k, k)
        y = run(model.core_block(t), x, first + t * C, loop=t, mask=mor_mask(causal, h.dtype), rope=rope)
        h = h.scatter_add(1, index[..., None].expand(-1, -1, hidden), gate.gather(1, index)[..., None].to(y.dtype) * y)
        kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, index, True)
        mor.last.append((logits.detach(), kept, torch.ones_like(kept) if active is None else active))
        active = kept
        states.append(h)
    return h


def mor_cached_attention(h, attention_mask, cache, past):
    """(the cache's routing history or None, allowed [batch, 1, seq, past + seq] (causal and padding),
    the diagonal [1, 1, seq, past + seq]) of a causal MoR forward."""
    batch, seq, _ = h.shape
    history = getattr(cache, "mor_selected", None) if cache is not None and past else None
    if past and history is None:
        raise ValueError("this KV cache was not filled by a MoR forward: it lacks the routing history")
    k_index = torch.arange(past + seq, device=h.device)
    causal = k_index[None, :] <= (past + torch.arange(seq, device=h.device))[:, None]  # [seq, past + seq]
    allowed = causal[None, None].expand(batch, 1, seq, past + seq)
    if attention_mask is not None and attention_mask.ndim == 2:  # padding [batch, past + seq]
        allowed = allowed & attention_mask[:, None, None, -(past + seq):].bool()
    diagonal = (k_index[None, :] == (past + torch.arange(seq, device=h.device))[:, None])[None, None]
    return history, allowed, diagonal


def mor_token_choice_loop(model, h, run, attention_mask, cache, past, states):
    """Token choice (model/mor_token.py): the router reads h0 once, d = argmax softmax; recursion t runs every
    token through the core, masked as the threshold loop (the tokens with d >= t are recursion t's), and keeps
    h = core(h) where d > t, h0 + g * core(h) where d == t (g = alpha * p_d), h where d < t. Causal: one loop for
    a full sequence (training's routing exactly) and for cached generation."""
    cfg, mor = model.config, model.mor
    first, C = cfg.num_prelude_layers, cfg.num_core_layers
    history, allowed, diagonal = mor_cached_attention(h, attention_mask, cache, past)
    share = cfg.mor_kv == "share-first"
    shared_kv = {}
    probs = torch.softmax(mor.router(h), dim=-1)  # [batch, seq, K]
    depth = (probs if mor.depth_bias is None else probs + mor.depth_bias).argmax(dim=-1)  # ties: shallower
    gate = cfg.mor_alpha * probs.gather(-1, depth[..., None])
    h0, selected = h, []
    mor.last, mor.depth, mor.probs = [], depth, probs.detach()
    for t in range(cfg.num_loops):
        chosen = depth >= t
        selected.append(chosen)
        if share:
            mask = allowed
        else:
            keys = chosen if history is None else torch.cat([history[t], chosen], dim=1)
            mask = allowed & (keys[:, None, None, :] | diagonal)
        y = run(model.core_block(t), h, first + t * C, loop=t, mask=mor_mask(mask, h.dtype),
                kv_share=(shared_kv, t > 0) if share else None)
        d = depth[..., None]
        h = torch.where(d > t, y, torch.where(d == t, h0 + gate.to(y.dtype) * y, h))
        states.append(h)
    if cache is not None:
        cache.mor_selected = [torch.cat([a, b], dim=1) for a, b in zip(history, selected)] if history else selected
    return h


def mor_threshold_loop(model, h, run, attention_mask, cache, past, states):
    """Causal routing by threshold, with either KV mode; `cache` (or None) keeps each recursion's selections;
    `past`: the tokens cached before this forward. Recursion t's core layers use cache entries P + t*C + j."""
    cfg, mor = model.config, model.mor
    first, C = cfg.num_prelude_layers, cfg.num_core_layers
    batch, seq, _ = h.shape
    history, allowed, diagonal = mor_cached_attention(h, attention_mask, cache, past)
    share = cfg.mor_kv == "share-first"
    shared_kv = {}
    active = torch.ones(batch, seq, dtype=torch.bool, device=h.device)
    selected = []
    mor.last = []
    for t in range(cfg.num_loops):
        logits = mor.routers[t](h)
        gate = cfg.mor_alpha * torch.sigmoid(logits)
        chosen = active & (torch.sigmoid(logits) > cfg.mor_threshold)  # [batch, seq]
        selected.append(chosen)
        if share:
            mask = allowed
        else:  # keys of the tokens processed at t (past ones from the cache); a query always sees itself
            keys = chosen if history is None else torch.cat([history[t], chosen], dim=1)
            mask = allowed & (keys[:, None, None, :] | diagonal)
        y = run(model.core_block(t), h, first + t * C, loop=t, mask=mor_mask(mask, h.dtype),
                kv_share=(shared_kv, t > 0) if share else None)
        h = torch.where(chosen[..., None], h + gate[..., None].to(y.dtype) * y, h)
        mor.last.append((logits.detach(), chosen, active))
        active = chosen
        states.append(h)
    if cache is not None:
        cache.mor_selected = [torch.cat([a, b], dim=1) for a, b in zip(history, selected)] if history else selected
    return h


# -----------------------------------------------------------------------------
# models


class MeshGPTNeoXPreTrainedModel(PreTrainedModel):
    config_class = MeshGPTNeoXConfig
    config: MeshGPTNeoXConfig
    base_model_prefix = "gpt_neox"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MeshGPTNeoXLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True

    @torch.no_grad()
    def _init_weights(self, module):
        """Fresh-model init. transformers.initialization skips tensors already loaded from a checkpoint."""
        std = self.config.initializer_range
        for name in ("lora_B", "bias_delta", "weight_delta"):  # relaxed sharing: starts as the plain recursion
            if getattr(module, name, None) is not None:
                init.zeros_(getattr(module, name))
        if getattr(module, "lora_A", None) is not None:
            init.normal_(module.lora_A, mean=0.0, std=std)
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, MoRRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.bias)
        elif isinstance(module, MeshRouter):
            # MESH_METHOD.md section 3 (decided): std sqrt(2 / (B * hidden)), truncated at 3 std, bias 0
            router_std = math.sqrt(2.0 / module.weight.numel())
            init.trunc_normal_(module.weight, mean=0.0, std=router_std, a=-3 * router_std, b=3 * router_std)
            init.zeros_(module.bias)
        elif isinstance(module, MeshRouters) and module.step_embedding is not None:
            init.zeros_(module.step_embedding)
        elif isinstance(module, MeshGPTNeoXModel) and module.state_scalars is not None:
            # (a1, a2, a3) = (1, 1, 0): every learned step starts as the anchor recurrence core(h_t) + h0
            init.copy_(module.state_scalars, torch.tensor([1.0, 1.0, 0.0]).expand_as(module.state_scalars))


class MeshGPTNeoXModel(MeshGPTNeoXPreTrainedModel):
    """Embeddings, prelude, looped core, coda and final LayerNorm (no output layer).

    `num_loops=N` runs N loop iterations instead of K (test-time depth); K below reads N then.

    `hidden_states` (with output_hidden_states=True) is a tuple of K + 4 tensors [batch, seq, hidden], in order:
        0      h_emb   embed_in(ids) * embedding_multiplier (the input to the prelude)
        1      h_pre   after the prelude
        2      h0      the state entering the loop: the MeSH transitional read for mesh variants,
                       h_pre again for every other variant
        3..K+2 h_1..h_K  the state after each loop step, state passing included (h_K enters the coda)
        K+3    h_out   after the coda, before final_layer_norm
    `last_hidden_state` is final_layer_norm(h_out).

    KV cache: one entry per executed layer application, P + C*K + Q in all, numbered in execution order:
    prelude layer i -> i, core layer j in loop step t -> P + t*C + j, coda layer j -> P + C*K + j. A shared core
    layer therefore owns K cache entries; the entry is passed to the attention at call time (`cache_idx`).
    With cache_iterations=M (Huginn's compressed cache) loop step t uses the entries of step t % M and the coda
    starts at P + C*M: P + C*M + Q entries whatever N.
    """

    def __init__(self, config: MeshGPTNeoXConfig):
        super().__init__(config)
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        # unique layers: prelude 0..P-1, core P..P+C-1 (K distinct blocks P..P+C*K-1 if not core_shared), coda
        relaxed = config.lora_rank > 0 or config.relax_biases or config.relax_norms
        core = range(config.num_prelude_layers, config.num_prelude_layers + config.num_core_layers)
        self.layers = nn.ModuleList(MeshGPTNeoXLayer(config, relaxed=relaxed and i in core)
                                    for i in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mesh = MeshRouters(config) if config.state_passing in MESH_VARIANTS else None
        self.mor = MoRRouters(config) if config.state_passing == "mor" else None
        # learned variant: (a1, a2, a3) per loop step, h_{t+1} = a1*core(h_t) + a2*h0 + a3*h_emb
        learned = config.state_passing == "learned"
        self.state_scalars = nn.Parameter(torch.empty(config.num_loops, 3)) if learned else None
        # input injection (configuration_mesh.py): the concat adapter over [h_t; e]
        concat = getattr(config, "input_injection", "none") == "concat-adapter"
        self.injection_adapter = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False) if concat else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_in

    def set_input_embeddings(self, value):
        self.embed_in = value

    def prelude(self):
        return self.layers[: self.config.num_prelude_layers]

    def core_block(self, t):
        """The C layers run at loop step t: the shared core, or distinct block t for vanilla+mesh."""
        P, C = self.config.num_prelude_layers, self.config.num_core_layers
        start = P + (0 if self.config.core_shared else t * C)
        return self.layers[start : start + C]

    def coda(self):
        return self.layers[len(self.layers) - self.config.num_coda_layers :]

    def _next_state(self, t, y, h, h0, h_emb):
        """Non-MeSH state passing, y = core(h_t) -> h_{t+1} (MESH_METHOD.md section 2)."""
        variant = self.config.state_passing
        if variant == "learned":
            a1, a2, a3 = self.state_scalars[t]
            return a1 * y + a2 * h0 + a3 * h_emb
        supplements = {"residual": h, "anchor": h0, "anchor_emb": h_emb}
        for name in variant.split("+"):  # base adds nothing; "residual+anchor" adds h_t and h0; ...
            if name != "base":
                y = y + supplements[name]
        return y

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        num_loops: int | None = None,
        cache_iterations: int | None = None,
        exit_threshold: float | None = None,
        exit_head=None,
        mor_inference: str | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        r"""
        inputs_embeds: replaces embed_in(input_ids); it is still multiplied by config.embedding_multiplier.
        mor_inference: MoR only, overrides config.mor_inference for this call (generate() passes "threshold").
        cache: KV cache with one entry per layer application (see the class docstring); a cache sized by
            config.num_hidden_layers, as generate() builds it, is extended before use.
        num_loops: loop iterations N of this forward (default config.num_loops = K); any N >= 1 where no weight
            is per step (config.fixed_depth: at most K). Keep it the same for every call sharing a cache.
            MoR (one router and capacity per iteration) runs exactly K: it refuses num_loops != K,
            cache_iterations and exit_threshold.
        cache_iterations: keep KV entries for at most M loop iterations, iteration t reusing entry t % M
            (Huginn's compressed cache, compress-s); default one per iteration.
        exit_threshold: decode steps (one new token per row) stop iterating a row once the KL divergence
            between successive iterations' next-token distributions (exit_head over the coda) is below it; its
            later cache entries repeat its last computed ones. 0 never exits.
        """
        cfg = self.config
        use_cache = cfg.use_cache if use_cache is None else use_cache
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_in(input_ids)  # [batch, seq, hidden]

        n = cfg.num_loops if num_loops is None else int(num_loops)
        if n < 1 or (cfg.fixed_depth and n > cfg.num_loops):
            raise ValueError(f"num_loops={n}: this model runs 1..{cfg.num_loops} iterations (it has weights per step)"
                             if cfg.fixed_depth else f"num_loops={n} must be >= 1")
        slots = n if cache_iterations is None else max(1, min(n, int(cache_iterations)))
        P, C = cfg.num_prelude_layers, cfg.num_core_layers
        routing = None
        if self.mor is not None:  # "auto": training's top-k for a plain forward, causal with a cache
            if num_loops is not None and n != cfg.num_loops or cache_iterations is not None or exit_threshold is not None:
                raise ValueError("MoR runs exactly its K iterations (one router and capacity each, tokens choose their "
                                 "depth): drop num_loops, cache_iterations and exit_threshold")
            routing = mor_inference or cfg.mor_inference
            if getattr(cfg, "mor_routing", "expert-choice") == "token-choice":
                if routing == "top-k":
                    raise ValueError("mor_inference 'top-k' is expert choice's: token-choice routing is causal "
                                     "(drop mor_inference)")
                routing = "token-choice"
            routing = ("threshold" if cache is not None else "top-k") if routing == "auto" else routing
            if routing == "top-k":
                if cache is not None or cfg.mor_kv != "recursion":
                    raise ValueError("mor_inference 'top-k' is training's routing over a whole sequence: no KV "
                                     "cache, mor_kv 'recursion' (generate, or pass mor_inference='threshold')")
                use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache()  # grows one entry per cache index it is given
        if cache is not None:
            _extend_cache(cache, P + C * slots + cfg.num_coda_layers)
        past_length = cache.get_seq_length() if cache is not None else 0
        seq = inputs_embeds.shape[1]
        if position_ids is None and attention_mask is not None and attention_mask.ndim == 2:
            # mask [batch, past + seq]: count real tokens only, as generate() does, so a left-padded row gets the
            # positions it would have unpadded
            position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)[:, -seq:]
        elif position_ids is None:  # no padding: continue after the cached tokens
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + seq, device=inputs_embeds.device)[None]
        # causal + padding mask in the format of the attention implementation (None when sdpa can use is_causal)
        mask = create_causal_mask(
            config=cfg,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        rope = rotary_cos_sin(cfg, position_ids, inputs_embeds.dtype)

        view = _IterationCache(cache, P, C, slots) if cache is not None else None

        def run(layers, h, first, loop=None, mask=mask, rope=rope, kv_share=None):  # cache entries first, first + 1, ...
            for j, layer in enumerate(layers):
                share = None if kv_share is None else (kv_share[0], j, kv_share[1])  # MoR share-first
                h = layer(h, attention_mask=mask, position_embeddings=rope, cache=view, cache_idx=first + j, loop=loop,
                          kv_share=share, **kwargs)
            return h

        h_emb = inputs_embeds * cfg.embedding_multiplier
        h_pre = run(self.prelude(), h_emb, 0)
        if self.mesh is not None:
            # buffer [batch, seq, hidden, B]: m_0 = h_emb, the other slots 0. It lives for this forward only; with a
            # KV cache it covers the new tokens only, which is exact because the buffer is per token.
            buffer = F.pad(h_emb.unsqueeze(-1), (0, cfg.mesh_slots - 1))
            buffer, h0 = self.mesh.step(0, buffer, router_input=h_pre, new_state=h_pre)  # transitional step
        else:
            h0 = h_pre
        if getattr(cfg, "state_init", "prelude") == "noise":
            h0 = torch.zeros_like(h0)  # the mean of training's noise start (its evaluation's start)
        states = [h_emb, h_pre, h0]
        injection = getattr(cfg, "input_injection", "none")

        def core_input(h):  # what the core reads: the state, plus the prelude's output when injected
            if injection == "add":
                return h + h_pre
            return self.injection_adapter(torch.cat([h, h_pre], dim=-1)) if injection == "concat-adapter" else h

        h = h0
        coda_first = P + C * slots
        early = exit_threshold is not None and seq == 1 and view is not None
        exited = torch.zeros(h.shape[:2], dtype=torch.bool, device=h.device) if early else None  # [batch, seq]
        log_p = None
        if self.mor is not None and routing == "token-choice":
            h = mor_token_choice_loop(self, h, run, attention_mask, cache, past_length, states)
        elif self.mor is not None and routing == "top-k":
            h = mor_top_k_loop(self, h, run, position_ids, states)
        elif self.mor is not None:
            h = mor_threshold_loop(self, h, run, attention_mask, cache, past_length, states)
        for t in range(n if self.mor is None else 0):
            if early and bool(exited.all()):  # every row is done: repeat its last entries, compute nothing
                view.repeat_last(range(P + (t % slots) * C, P + (t % slots) * C + C))
                states.append(h)
                continue
            view is not None and view.freeze(exited)
            y = run(self.core_block(t), core_input(h), P + (t % slots) * C, loop=t)
            if self.mesh is not None:
                buffer, h_next = self.mesh.step(t + 1, buffer, router_input=h, new_state=y)
            else:
                h_next = self._next_state(t, y, h, h0, h_emb)
            h = h_next if exited is None else torch.where(exited[..., None], h, h_next)
            states.append(h)
            if early and t < n - 1:  # the next-token distribution after this iteration (coda entries overwritten)
                new_log_p = F.log_softmax(exit_head(self.final_layer_norm(run(self.coda(), h, coda_first))).float(), -1)
                if log_p is not None:
                    kl = F.kl_div(new_log_p, log_p, log_target=True, reduction="none").sum(-1).clamp_min(0)
                    exited = exited | (kl < exit_threshold)
                log_p = new_log_p
        view is not None and view.freeze(None)
        self.exit_mask = exited  # rows that stopped early in the last decode step (None without early exit)

        h_out = run(self.coda(), h, coda_first)
        states.append(h_out)
        return BaseModelOutputWithPast(
            last_hidden_state=self.final_layer_norm(h_out),
            cache=cache if use_cache else None,
            hidden_states=tuple(states) if output_hidden_states else None,
        )


class _IterationCache:
    """The KV cache as one forward sees it (the attention calls update(k, v, idx)).

    An entry written a second time in the same forward (a compressed cache's reused iteration entry, or the coda
    run again by the early-exit probe) replaces the new tokens' keys and values instead of appending them. While
    `freeze(mask)` holds, the masked tokens of a core layer write the keys and values that layer last computed
    for them (an exited token's later iterations repeat its last computed entry).
    """

    def __init__(self, cache, prelude, core, iterations):
        self.cache, self.prelude, self.core, self.end = cache, prelude, core, prelude + core * iterations
        self.written, self.last, self.frozen = set(), {}, None

    def __getattr__(self, name):  # everything else (get_seq_length, ...) is the cache's
        return getattr(self.cache, name)

    def freeze(self, mask):
        self.frozen = None if mask is None or not bool(mask.any()) else mask

    def _core_layer(self, idx):
        return (idx - self.prelude) % self.core if self.prelude <= idx < self.end else None

    def update(self, k, v, idx):
        j = self._core_layer(idx)
        if self.frozen is not None and j is not None and j in self.last:
            m = self.frozen[:, None, :, None]  # [batch, 1, seq, 1] over [batch, heads, seq, head_dim]
            k, v = torch.where(m, self.last[j][0], k), torch.where(m, self.last[j][1], v)
        if j is not None:
            self.last[j] = (k, v)
        if idx not in self.written:
            self.written.add(idx)
            return self.cache.update(k, v, idx)
        layer, s = self.cache.layers[idx], k.shape[-2]
        layer.keys = torch.cat([layer.keys[..., :-s, :], k], dim=-2)
        layer.values = torch.cat([layer.values[..., :-s, :], v], dim=-2)
        return layer.keys, layer.values

    def repeat_last(self, indices):
        """Write every core layer's last keys and values into `indices` without computing them."""
        for idx in indices:
            self.update(*self.last[self._core_layer(idx)], idx)


def _extend_cache(cache, num_entries):
    """Give the cache one entry per layer application.

    generate() and DynamicCache(config=...) size a cache by config.num_hidden_layers, the unique layers; a looped
    model needs P + C*K + Q. A lazily grown DynamicCache() needs nothing; a cache of fixed-size layers (static)
    is not supported.
    """
    missing = num_entries - len(cache.layers)
    if missing <= 0 or cache.layer_class_to_replicate is not None:
        return
    if not isinstance(cache, DynamicCache):
        raise ValueError(f"{type(cache).__name__} has {len(cache.layers)} layers, not {num_entries}: use DynamicCache")
    cache.layers.extend(DynamicLayer() for _ in range(missing))


class MeshGPTNeoXForCausalLM(MeshGPTNeoXPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"embed_out.weight": "gpt_neox.embed_in.weight"}  # applied only if tie_word_embeddings

    def __init__(self, config: MeshGPTNeoXConfig):
        super().__init__(config)
        self.gpt_neox = MeshGPTNeoXModel(config)
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.embed_out

    def set_output_embeddings(self, new_embeddings):
        self.embed_out = new_embeddings

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_loops: int | None = None,
        cache_iterations: int | None = None,
        exit_threshold: float | None = None,
        mor_inference: str | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        labels: [batch, seq] token ids, -100 ignored; shifted inside the loss (position i predicts labels[i + 1]).
        logits_to_keep: compute logits for the last N positions only (0 = all), or for the given indices.
        num_loops, cache_iterations, exit_threshold: test-time depth (MeshGPTNeoXModel.forward); generate() passes
            them to every step.
        """
        outputs = self.gpt_neox(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            num_loops=num_loops,
            cache_iterations=cache_iterations,
            exit_threshold=exit_threshold,
            exit_head=self.embed_out if exit_threshold is not None else None,
            mor_inference=mor_inference,
            **kwargs,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.embed_out(outputs.last_hidden_state[:, keep, :])  # [batch, kept, vocab]

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )


    def prepare_inputs_for_generation(self, *args, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        if self.config.state_passing == "mor":  # causal routing, with or without a KV cache
            inputs["mor_inference"] = "threshold" if self.config.mor_inference == "auto" else self.config.mor_inference
        return inputs


# save_pretrained writes auto_map entries and copies this file and configuration_mesh.py next to the weights
MeshGPTNeoXModel.register_for_auto_class("AutoModel")
MeshGPTNeoXForCausalLM.register_for_auto_class("AutoModelForCausalLM")
