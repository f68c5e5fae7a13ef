"""Hugging Face config of an exported MeSH recursive GPT-NeoX model (arXiv 2510.07739).

The layout is `P+CrK+Q`: P unshared prelude layers, a core block of C layers run K times, Q unshared coda
layers (docs/MESH_METHOD.md section 1). `state_passing` selects how the state travels between loop steps
(section 2) and `mesh_slots` sizes the MeSH buffer (section 3).

This file is copied next to exported weights and loaded with `trust_remote_code=True`, so it imports
nothing from mesh_megatron.
"""

from huggingface_hub.dataclasses import strict
from transformers import PretrainedConfig

# every recurrence modeling_mesh.py implements; see MeshGPTNeoXModel._next_state for the formulas
STATE_PASSING_VARIANTS = (
    "base",
    "residual",
    "anchor",
    "anchor_emb",
    "mesh",
    "residual+anchor",
    "anchor+anchor_emb",
    "learned",
    "vanilla+mesh",
    "mor",
)
MESH_VARIANTS = ("mesh", "vanilla+mesh")
MOR_KV_MODES = ("recursion", "share-first")
MOR_ROUTINGS = ("expert-choice", "token-choice")
MOR_INFERENCE = ("auto", "threshold", "top-k")


@strict
class MeshGPTNeoXConfig(PretrainedConfig):
    r"""
    GPT-NeoX (Pythia) backbone fields, under GPT-NeoX's own names:
        vocab_size: rows of embed_in / embed_out, already padded (e.g. 50304 for the GPT-NeoX tokenizer).
        hidden_size, num_attention_heads, intermediate_size: widths; head_dim = hidden_size // num_attention_heads.
        hidden_act: MLP activation, a key of transformers' ACT2FN ("gelu" is the exact erf GELU).
        rotary_pct: fraction of each head's dims that get rotary embeddings (non-interleaved, rotate_half).
        rotary_emb_base: rotary base theta.
        max_position_embeddings: longest sequence the model was trained for (informational, rotary has no table).
        layer_norm_eps: epsilon of every LayerNorm.
        use_parallel_residual: x + attn(ln1(x)) + mlp(ln2(x)) if True (Pythia), else sequential residuals.
        initializer_range: std of the normal init of linears and embeddings in `_init_weights`.
        tie_word_embeddings: share embed_in and embed_out (False for Pythia and the paper).
        attention_bias: biases on query_key_value and dense.

    Recursion fields:
        num_prelude_layers (P), num_core_layers (C), num_loops (K), num_coda_layers (Q).
        core_shared: True for looped variants (one core block applied K times); False for "vanilla+mesh",
            whose K core blocks are distinct layers.
        state_passing: one of STATE_PASSING_VARIANTS.
        mesh_slots (B): MeSH buffer slots, used by "mesh" and "vanilla+mesh"; None means the paper's K + 3.
        mesh_router_init, mesh_router_margin: how training initialised the MeSH router biases ("paper": 0;
            "base": +margin on each step's own slot). A record of the run only: the trained weights are
            loaded, and this model's own forward does not read them.
        mesh_routers: "per-step" (the paper: K + 1 router pairs, depth fixed at K) or "shared" (pair 0 for the
            transitional step, pair 1 for every loop iteration: runs at any `num_loops`); mesh_step_embedding: the
            shared routers read h_t + step_embedding[min(t, B - 1)].
        input_injection: what the core reads besides the state h_t, with e = the prelude's output: "none", "add"
            (h_t + e) or "concat-adapter" (gpt_neox.injection_adapter([h_t; e]), Linear(2h -> h) without bias).
        state_init: "prelude" (the loop starts from e, or MeSH's transitional read) or "noise" (training drew a
            truncated-normal start; this model starts from its mean, zeros, as training's evaluation does).
        embedding_multiplier: the input embeddings are multiplied by it, sqrt(hidden_size) when the paper's
            embedding scaling is on, 1.0 when off.
        lora_rank, lora_alpha, lora_targets, relax_biases, relax_norms: relaxed sharing (arXiv 2410.20672), core
            layers only: a rank-lora_rank adapter per loop step on each of lora_targets (comma list of
            query_key_value, dense, dense_h_to_4h, dense_4h_to_h), scaled by lora_alpha / lora_rank (None: 1),
            and per-step bias / LayerNorm deltas. 0 / False: the plain recursion.
        mor_routing, mor_capacities, mor_alpha: Mixture-of-Recursions (state_passing "mor", arXiv 2507.10524):
            expert-choice routers `gpt_neox.mor.routers.{r}` (Linear hidden -> 1), gate alpha * sigmoid(logit),
            update h + gate * core(h) at the tokens recursion r processes; mor_capacities (one per loop step)
            are training's top-k fractions. mor_routing "token-choice": one router `gpt_neox.mor.router`
            (Linear hidden -> num_loops) reads h0 and gives each token its depth d = argmax softmax (top-1);
            recursion r runs the tokens with d >= r, h = core(h) while going on and h0 + alpha * p_d * core(h)
            at the last one (causal by construction: mor_inference does not apply, "top-k" is refused).
            mor_bias_rate set (training's loss-free balancing): the buffer `gpt_neox.mor.depth_bias` [K] is added
            to the probabilities for the argmax only.
        mor_inference: how a forward picks the tokens: "auto" (the default: top-k for a forward without a KV
            cache, threshold under generate(), with or without a cache, or with a cache), "threshold" (causal: a token active at
            r is processed when sigmoid(logit) > mor_threshold, the router having been trained to predict its
            top-k membership) or "top-k" (training's exact routing, over the whole given sequence: not causal,
            refused with a KV cache). Selectable at load time (from_pretrained(..., mor_inference="top-k")).
        mor_kv: KV of the core's attention: "recursion" (recursion-wise: at recursion r a token attends only
            to the earlier tokens processed at r) or "share-first" (recursive KV sharing: every recursion
            attends to the first recursion's keys and values of all tokens). Selectable at load time.
        num_hidden_layers: number of UNIQUE layers (weights under gpt_neox.layers.*): P + C + Q if core_shared
            else P + C*K + Q. Derived when None; checked when given. The forward pass executes
            P + C*K + Q layer applications in both cases (`num_layer_applications`).
    """

    model_type = "mesh_gpt_neox"

    # GPT-NeoX backbone
    vocab_size: int = 50304
    hidden_size: int = 2048
    num_attention_heads: int = 16
    intermediate_size: int = 8192
    hidden_act: str = "gelu"
    rotary_pct: float = 0.25
    rotary_emb_base: int | float = 10000
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    attention_bias: bool = True
    use_cache: bool = True
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0
    pad_token_id: int | None = None

    # recursion (defaults: the 1.4B 4+8R2+4 MeSH preset)
    num_prelude_layers: int = 4
    num_core_layers: int = 8
    num_loops: int = 2
    num_coda_layers: int = 4
    core_shared: bool = True
    state_passing: str = "mesh"
    mesh_slots: int | None = None
    mesh_router_init: str = "paper"
    mesh_router_margin: float | None = None
    mesh_routers: str = "per-step"
    mesh_step_embedding: bool = False
    input_injection: str = "none"
    state_init: str = "prelude"
    embedding_multiplier: float | int = 1.0
    lora_rank: int = 0
    lora_alpha: float | int | None = None
    lora_targets: str = "query_key_value,dense,dense_h_to_4h,dense_4h_to_h"
    relax_biases: bool = False
    relax_norms: bool = False
    mor_routing: str = "expert-choice"
    mor_capacities: list[float] | None = None
    mor_alpha: float | int = 0.1
    mor_inference: str = "auto"
    mor_threshold: float = 0.5
    mor_kv: str = "recursion"
    mor_bias_rate: float | None = None
    num_hidden_layers: int | None = None

    def __post_init__(self, **kwargs):
        if self.mesh_slots is None:
            self.mesh_slots = self.num_loops + 3  # paper default B = K + 3
        if self.num_hidden_layers is None:
            self.num_hidden_layers = self.num_unique_layers
        super().__post_init__(**kwargs)

    @property
    def num_unique_layers(self) -> int:
        core = self.num_core_layers if self.core_shared else self.num_core_layers * self.num_loops
        return self.num_prelude_layers + core + self.num_coda_layers

    @property
    def fixed_depth(self) -> bool:
        """Whether some weights exist per loop step (per-step MeSH routers, `learned` scalars, vanilla+mesh's
        distinct blocks, relaxed sharing's per-iteration adapters, MoR's routers and capacities): then a forward
        runs at most num_loops iterations (MoR: exactly num_loops)."""
        return not self.core_shared or self.state_passing in ("learned", "mor") or (
            self.state_passing == "mesh" and self.mesh_routers == "per-step") or bool(
            self.lora_rank or self.relax_biases or self.relax_norms)

    @property
    def num_layer_applications(self) -> int:
        """Compute depth P + C*K + Q: layers executed per token, and KV-cache entries."""
        return self.num_prelude_layers + self.num_core_layers * self.num_loops + self.num_coda_layers

    def validate_architecture(self):
        """Called by @strict after __init__: reject configs the model cannot run."""
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by {self.num_attention_heads} heads")
        rotary_ndims = int(self.hidden_size // self.num_attention_heads * self.rotary_pct)
        if not 0 < self.rotary_pct <= 1 or rotary_ndims % 2 != 0:
            raise ValueError(f"rotary_pct {self.rotary_pct} must give an even number (> 0) of rotary dims per head")
        if self.state_passing not in STATE_PASSING_VARIANTS:
            raise ValueError(f"state_passing {self.state_passing!r} not in {STATE_PASSING_VARIANTS}")
        if self.core_shared != (self.state_passing != "vanilla+mesh"):
            raise ValueError("core_shared must be False for state_passing='vanilla+mesh' and True otherwise")
        if min(self.num_prelude_layers, self.num_coda_layers) < 0 or min(self.num_core_layers, self.num_loops) < 1:
            raise ValueError("need num_prelude_layers, num_coda_layers >= 0 and num_core_layers, num_loops >= 1")
        if self.state_passing in MESH_VARIANTS and self.mesh_slots < 2:
            raise ValueError(f"mesh_slots must be >= 2 (slot 0 holds h_emb), got {self.mesh_slots}")
        if (self.lora_rank or self.relax_biases or self.relax_norms) and not self.core_shared:
            raise ValueError("lora_rank / relax_biases / relax_norms relax a shared core: core_shared must be True")
        if self.mesh_routers not in ("per-step", "shared"):
            raise ValueError(f"mesh_routers {self.mesh_routers!r} not in ('per-step', 'shared')")
        if self.mesh_routers == "shared" and self.state_passing != "mesh":
            raise ValueError("mesh_routers='shared' needs state_passing='mesh'")
        if self.state_passing == "mor":
            if self.mor_routing not in MOR_ROUTINGS:
                raise ValueError(f"mor_routing {self.mor_routing!r}: this model implements {MOR_ROUTINGS}")
            if self.mor_routing == "token-choice" and self.mor_capacities is not None:
                raise ValueError("mor_routing 'token-choice' picks a depth per token: mor_capacities must be None")
            if self.mor_capacities is not None and len(self.mor_capacities) != self.num_loops:
                raise ValueError(f"mor_capacities needs one entry per loop step ({self.num_loops})")
            if self.mor_kv not in MOR_KV_MODES or self.mor_inference not in MOR_INFERENCE:
                raise ValueError(f"mor_kv must be one of {MOR_KV_MODES} and mor_inference one of {MOR_INFERENCE}")
            if self.input_injection != "none" or self.state_init != "prelude":
                raise ValueError("state_passing='mor' routes the state itself: input_injection must be 'none' and "
                                 "state_init 'prelude'")
        if self.num_hidden_layers != self.num_unique_layers:
            raise ValueError(
                f"num_hidden_layers {self.num_hidden_layers} != unique layers {self.num_unique_layers} "
                f"(P + C + Q if core_shared else P + C*K + Q)"
            )


MeshGPTNeoXConfig.register_for_auto_class()  # save_pretrained writes auto_map["AutoConfig"] and copies this file
