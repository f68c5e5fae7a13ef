"""Typed configuration for MeSH recursive transformers.

One place owns every model decision:
  * `Layout`       - the recursion shape `P+CrK+Q` (prelude, shared core run K times, coda);
  * `ModelConfig`  - width, layout, state-passing variant, MeSH slots, init switches;
  * `ParallelConfig` - tensor / pipeline model-parallel sizes;
  * `validate()`   - rejects a bad combination with one message naming the field and the fix;
  * `preset()`     - the paper's Pythia shapes by name (docs/MESH_METHOD.md section 4);
  * `to_transformer_config()` - the single conversion to megatron-core's TransformerConfig.

Model code reads fields from these objects; it never re-parses strings or flags.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


# --------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------

# Additive state passing: h_{t+1} = core(h_t) + sum of these supplements.
#   "h_t"   the state entering this iteration (residual), "h0" the loop's input (anchor),
#   "h_emb" the scaled token embeddings (anchor_emb, the paper's anchor*).
ADDITIVE_SUPPLEMENTS: dict[str, tuple[str, ...]] = {
    "base": (),
    "residual": ("h_t",),
    "anchor": ("h0",),
    "anchor_emb": ("h_emb",),
    "residual+anchor": ("h_t", "h0"),
    "anchor+anchor_emb": ("h0", "h_emb"),
}
MESH_VARIANTS = ("mesh", "vanilla+mesh")
MESH_ROUTER_INITS = ("paper", "base")
MESH_ROUTERS = ("per-step", "shared")
INPUT_INJECTIONS = ("none", "add", "concat-adapter")
STATE_INITS = ("prelude", "noise")
MESH_ROUTER_MARGIN = 4.0  # "base" init: target slot weight e^4 / (e^4 + B - 1), 0.93 at B = 5
# `learned`: h_{t+1} = a1 * core(h_t) + a2 * h0 + a3 * h_emb, (a1, a2, a3) learned per loop step.
# `mor`: Mixture-of-Recursions (model/mor.py): a router picks which tokens each iteration processes.
VARIANTS = ("vanilla", *ADDITIVE_SUPPLEMENTS, "learned", *MESH_VARIANTS, "mor")
MOR_ROUTINGS = ("expert-choice", "token-choice")
MOR_KV_MODES = ("recursion", "share-first")  # HF generation only (hf/modeling_mesh.py)

# Relaxed sharing (model/relaxation.py): the core's linears that get a LoRA per loop iteration,
# by their Pythia (HF) names, with our training names as aliases.
LORA_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
LORA_TARGET_ALIASES = {"linear_qkv": "query_key_value", "linear_proj": "dense", "linear_fc1": "dense_h_to_4h",
                       "linear_fc2": "dense_4h_to_h"}
LORA_FULL = "full"


def parse_lora_targets(text: str) -> tuple[str, ...]:
    """`dense,query_key_value` (Pythia or training names) -> Pythia names in layer order."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    for item in items:
        if LORA_TARGET_ALIASES.get(item, item) not in LORA_TARGETS:
            raise ConfigError(f"lora target {item!r} is unknown: --lora-targets takes a comma list of "
                              f"{', '.join(LORA_TARGETS)} (or {', '.join(LORA_TARGET_ALIASES)})")
    chosen = {LORA_TARGET_ALIASES.get(i, i) for i in items}
    return tuple(t for t in LORA_TARGETS if t in chosen)


def parse_capacities(text) -> tuple[float, ...]:
    """`1.0,0.5` (or a list) -> (1.0, 0.5); a malformed entry is a ConfigError."""
    items = text if isinstance(text, (list, tuple)) else [t for t in str(text).split(",") if t.strip()]
    try:
        return tuple(float(t) for t in items)
    except ValueError:
        raise ConfigError(f"mor_capacities {text!r} is malformed: give one fraction per loop iteration, "
                          "e.g. --mor-capacities 1.0,0.5") from None


# --------------------------------------------------------------------------------------
# Layout: P+CrK+Q
# --------------------------------------------------------------------------------------

_LAYOUT_RE = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*[rR]\s*(\d+)\s*\+\s*(\d+)\s*$")
_PLAIN_RE = re.compile(r"^\s*(\d+)\s*$")


@dataclass(frozen=True)
class Layout:
    """Prelude layers, core layers, loop count and coda layers of a recursive model."""

    prelude: int
    core: int
    loops: int
    coda: int

    @classmethod
    def parse(cls, text: str) -> "Layout":
        """`"4+8R2+4"` -> Layout(4, 8, 2, 4); a plain `"24"` is a 24-layer stack (no loop)."""
        text = str(text)
        m = _LAYOUT_RE.match(text)
        if m:
            return cls(*(int(g) for g in m.groups()))
        m = _PLAIN_RE.match(text)
        if m:
            return cls(prelude=int(m.group(1)), core=0, loops=0, coda=0)
        raise ConfigError(
            f"layout {text!r} is malformed: write P+CrK+Q (e.g. '4+8R2+4': 4 prelude layers, "
            "an 8-layer core looped 2 times, 4 coda layers) or a plain layer count for vanilla"
        )

    @property
    def is_looped(self) -> bool:
        return self.core > 0 and self.loops > 0

    @property
    def compute_depth(self) -> int:
        """Layers applied per forward pass: P + C*K + Q."""
        return self.prelude + self.core * self.loops + self.coda

    def __str__(self) -> str:
        if not self.is_looped:
            return str(self.prelude)
        return f"{self.prelude}+{self.core}R{self.loops}+{self.coda}"


# --------------------------------------------------------------------------------------
# Model and parallel configs
# --------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Everything that shapes the network. Defaults are the `tiny` debug flavor."""

    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_hidden_size: Optional[int] = None  # None -> 4 * hidden_size (GPT-NeoX)
    layout: str = "1+2R2+1"
    variant: str = "mesh"
    # MeSH buffer slots B; None -> K + 3 for mesh variants (the paper's best).
    mesh_slots: Optional[int] = None
    # MeSH router init (docs/MESH_METHOD.md section 3): "paper" (bias 0: near-uniform
    # routing) or "base" (bias +margin on a fresh slot per step: MeSH starts as the base
    # recursion). The margin is "base"'s only; None -> MESH_ROUTER_MARGIN.
    mesh_router_init: str = "paper"
    mesh_router_margin: Optional[float] = None
    # MeSH routers (docs/MESH_METHOD.md section 7a): "per-step" (the paper: one write/read pair per
    # step, K + 1 pairs, fixed depth) or "shared" (one pair for the transitional step, one shared by
    # every loop iteration: any depth); mesh_step_embedding adds a learned step vector to the
    # shared routers' input.
    mesh_routers: str = "per-step"
    mesh_step_embedding: bool = False
    # Loop input (model/injection.py; Huginn): what the core reads besides the state ("none", "add"
    # h_t + e, "concat-adapter" Linear(2h -> h) of [h_t; e], e = the prelude's output) and where the
    # state starts ("prelude": e; "noise": truncated normal in training, zeros in eval).
    input_injection: str = "none"
    state_init: str = "prelude"
    vocab_size: int = 4096  # tokenizer vocabulary; padded below
    make_vocab_size_divisible_by: int = 128
    seq_length: int = 128  # longest sequence the model is trained on
    # Paper details (docs/MESH_METHOD.md section 1), on for every preset variant.
    scale_embeddings: bool = True  # h_emb = embedding * sqrt(hidden)
    depth_scaled_init: bool = True  # output projections std / sqrt(2 * compute_depth)
    init_std: Optional[float] = None  # None -> GPT-NeoX small init sqrt(2 / (5 * hidden))
    layernorm_epsilon: float = 1e-5
    rotary_percent: float = 0.25
    rotary_base: int = 10000
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    # Initial (a1, a2, a3) of the `learned` variant; (1, 1, 0) starts it as `anchor`.
    learned_scalar_init: tuple[float, float, float] = (1.0, 1.0, 0.0)
    # Relaxed sharing (docs/MESH_METHOD.md section 8): a rank-r LoRA per loop iteration on the
    # core's `lora_targets`, scaled by lora_alpha / r (None -> alpha = r, scale 1); per-iteration
    # biases / LayerNorm affines. lora_rank "full" = min(hidden, ffn) with both relaxed.
    lora_rank: int = 0
    lora_alpha: Optional[float] = None
    lora_targets: str = ",".join(LORA_TARGETS)
    relax_biases: bool = False
    relax_norms: bool = False
    # Mixture-of-Recursions (variant `mor`, model/mor.py, docs/MESH_METHOD.md section 9): routing
    # mode; capacities, one per loop iteration, comma list (None -> (K - r) / K); router scale
    # alpha; weights of the auxiliary BCE loss and of the router z-loss; the export's KV mode.
    # Token choice (model/mor_token.py): one router picks each token's depth; its Switch balancing
    # loss weight (mor_balance_weight; None -> 0.01 under token choice); alpha None -> 0.1 under
    # expert choice (gate alpha * sigmoid), 1.0 under token choice (alpha * softmax, the reference's).
    mor_routing: str = "expert-choice"
    mor_capacities: Optional[str] = None
    mor_alpha: Optional[float] = None
    mor_aux_weight: float = 0.001
    mor_z_loss: float = 0.0
    mor_kv: str = "recursion"
    mor_balance_weight: Optional[float] = None
    mor_bias_rate: Optional[float] = None  # token choice: loss-free balancing's bias step (None: off)

    def __post_init__(self):
        if self.lora_rank == LORA_FULL:
            self.lora_rank = min(self.hidden_size, self.ffn_size)
            self.relax_biases = self.relax_norms = True
        self.lora_targets = ",".join(parse_lora_targets(self.lora_targets))
        if isinstance(self.mor_capacities, (list, tuple)):  # a YAML list
            self.mor_capacities = ",".join(repr(float(c)) for c in self.mor_capacities)

    # ---- derived views (never stored twice) ----
    @property
    def parsed_layout(self) -> Layout:
        return Layout.parse(self.layout)

    @property
    def core_shared(self) -> bool:
        """True when one set of core weights runs K times; vanilla and vanilla+mesh unroll."""
        return self.variant not in ("vanilla", "vanilla+mesh")

    @property
    def is_mesh(self) -> bool:
        return self.variant in MESH_VARIANTS

    @property
    def slots(self) -> int:
        """MeSH buffer slots B (0 for variants without a buffer)."""
        if not self.is_mesh:
            return 0
        return self.mesh_slots if self.mesh_slots is not None else self.parsed_layout.loops + 3

    @property
    def router_margin(self) -> float:
        """The bias on each step's own slot under `mesh_router_init: base` (0 for `paper`)."""
        if self.mesh_router_init != "base":
            return 0.0
        return self.mesh_router_margin if self.mesh_router_margin is not None else MESH_ROUTER_MARGIN

    @property
    def lora_target_names(self) -> tuple[str, ...]:
        return tuple(self.lora_targets.split(",")) if self.lora_targets else ()

    @property
    def lora_scale(self) -> float:
        """alpha / r, LoRA's scaling of B A (1 when lora_alpha is None)."""
        if not self.lora_rank:
            return 0.0
        return (self.lora_alpha if self.lora_alpha is not None else self.lora_rank) / self.lora_rank

    @property
    def is_mor(self) -> bool:
        return self.variant == "mor"

    @property
    def capacities(self) -> tuple[float, ...]:
        """MoR: the fraction of the sequence iteration r processes; default (K - r) / K."""
        loops = self.parsed_layout.loops
        if self.mor_capacities is None:
            return tuple((loops - r) / loops for r in range(loops))
        return parse_capacities(self.mor_capacities)

    @property
    def is_token_choice(self) -> bool:
        return self.is_mor and self.mor_routing == "token-choice"

    @property
    def gate_alpha(self) -> float:
        """MoR's gate scale: mor_alpha, or 1.0 under token choice (alpha * softmax) and 0.1 under expert
        choice (alpha * sigmoid) when unset."""
        if self.mor_alpha is not None:
            return self.mor_alpha
        return 1.0 if self.mor_routing == "token-choice" else 0.1

    @property
    def balance_weight(self) -> float:
        """Token choice: the weight of the Switch balancing loss (0.01 when unset)."""
        return 0.01 if self.mor_balance_weight is None else self.mor_balance_weight

    @property
    def is_relaxed(self) -> bool:
        return bool(self.lora_rank or self.relax_biases or self.relax_norms)

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def weight_init_std(self) -> float:
        return self.init_std if self.init_std is not None else math.sqrt(2.0 / (5 * self.hidden_size))

    @property
    def output_proj_init_std(self) -> float:
        """Std of attention dense and MLP down-projection (scaled by compute depth)."""
        if not self.depth_scaled_init:
            return self.weight_init_std
        return self.weight_init_std / math.sqrt(2.0 * self.compute_depth)

    @property
    def compute_depth(self) -> int:
        return self.parsed_layout.compute_depth

    @property
    def unique_depth(self) -> int:
        layout = self.parsed_layout
        if self.core_shared:
            return layout.prelude + layout.core + layout.coda
        return layout.compute_depth

    @property
    def embedding_multiplier(self) -> float:
        return math.sqrt(self.hidden_size) if self.scale_embeddings else 1.0

    def padded_vocab_size(self, tensor_parallel_size: int = 1) -> int:
        """Megatron's padding: up to a multiple of divisible_by * TP."""
        from mesh_megatron.data.vocab import pad_vocab_size

        return pad_vocab_size(self.vocab_size, self.make_vocab_size_divisible_by, tensor_parallel_size)


ATTENTION_BACKENDS = ("auto", "te", "sdpa", "local")
RECOMPUTE = ("none", "loop", "layer")


@dataclass
class ExecutionConfig:
    """How the network runs, not what it computes: kernels and activation memory.

    Never part of a checkpoint's model config: any backend or recompute setting loads any
    checkpoint and gives the same math (up to kernel rounding).
    """

    # auto = Transformer Engine when importable on a GPU, else torch sdpa; local = megatron's
    # unfused DotProductAttention (reference).
    attention_backend: str = "auto"
    # none; loop = recompute each core iteration (and prelude/coda as blocks) in backward,
    # keeping only the states between iterations; layer = recompute each layer.
    recompute: str = "none"
    # torch.compile of each transformer layer (model/compilation.py); off = eager.
    compile: bool = False

    def validate(self) -> None:
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"attention backend {self.attention_backend!r} is unknown: choose one of "
                              f"{', '.join(ATTENTION_BACKENDS)}")
        if self.recompute not in RECOMPUTE:
            raise ConfigError(f"recompute {self.recompute!r} is unknown: choose one of {', '.join(RECOMPUTE)}")


RECURRENCE_SAMPLINGS = ("fixed", "poisson-lognormal")


@dataclass
class RecurrenceConfig:
    """How many loop iterations a training forward runs, and how many of them backpropagate
    (model/recurrence.py; docs/MESH_METHOD.md section 6; Huginn, arXiv 2502.05171).

    Never part of a checkpoint's model config: evaluation and the export run the layout's K
    (the export takes any `num_loops`), whatever training drew.
    """

    # fixed: K every forward (the layout's); poisson-lognormal: Huginn's
    # n = Poisson(LogNormal(log R - sigma^2 / 2, sigma = 0.5)) + 1 per micro-batch.
    sampling: str = "fixed"
    mean_recurrence: Optional[float] = None  # R of poisson-lognormal (E[n] = R + 1)
    backprop_depth: Optional[int] = None  # k: only the last min(n, k) iterations backpropagate; None: all
    seed: int = 0  # the draws are a function of (seed, iteration, micro-batch): the run's --seed

    @property
    def is_random(self) -> bool:
        return self.sampling != "fixed"


def validate_recurrence(model: "ModelConfig", recurrence: RecurrenceConfig) -> None:
    """Refuse a recurrence the model cannot run: one line naming the flag and the fix."""
    if recurrence.sampling not in RECURRENCE_SAMPLINGS:
        raise ConfigError(f"--recurrence-sampling {recurrence.sampling!r} is unknown: choose one of "
                          f"{', '.join(RECURRENCE_SAMPLINGS)}")
    if recurrence.backprop_depth is not None and recurrence.backprop_depth < 1:
        raise ConfigError(f"--backprop-depth {recurrence.backprop_depth} must be >= 1 (the last k loop "
                          "iterations backpropagate; leave it out to backpropagate through all)")
    if not recurrence.is_random:
        if recurrence.mean_recurrence is not None:
            raise ConfigError("--mean-recurrence is set but --recurrence-sampling is 'fixed' (every forward runs "
                              "the layout's K): add --recurrence-sampling poisson-lognormal or drop it")
    elif recurrence.mean_recurrence is None or not recurrence.mean_recurrence > 0:
        raise ConfigError(f"--recurrence-sampling {recurrence.sampling} needs --mean-recurrence R > 0 (got "
                          f"{recurrence.mean_recurrence}; Huginn's rate mean, E[iterations] = R + 1)")
    if (recurrence.is_random or recurrence.backprop_depth is not None) and not model.parsed_layout.is_looped:
        raise ConfigError(f"--recurrence-sampling/--backprop-depth need a looped model; variant "
                          f"{model.variant!r} with layout {model.layout!r} has no loop")
    if model.is_mor and (recurrence.is_random or recurrence.backprop_depth is not None):
        raise ConfigError("--recurrence-sampling/--backprop-depth with variant 'mor': its routers and "
                          "--mor-capacities are one per iteration of exactly K, each trained through backward; "
                          "drop them (MoR varies the depth per token itself)")
    if recurrence.is_random:
        if not model.core_shared:
            raise ConfigError(f"--recurrence-sampling {recurrence.sampling} needs a shared core: variant "
                              f"{model.variant!r} has K distinct blocks (use 'mesh' or an additive variant)")
        if model.variant == "learned":
            raise ConfigError("--recurrence-sampling poisson-lognormal cannot run variant 'learned': it learns "
                              "scalars for exactly K steps; use an additive variant or mesh with "
                              "--mesh-routers shared")
        if model.lora_rank or model.relax_biases or model.relax_norms:
            raise ConfigError(f"--recurrence-sampling {recurrence.sampling} with relaxed sharing (--lora-rank/"
                              "--relax-biases/--relax-norms): the adapters exist for exactly K loop positions; "
                              "drop one of them")
        if model.is_mesh and model.mesh_routers != "shared":
            raise ConfigError("--recurrence-sampling poisson-lognormal with variant 'mesh' needs --mesh-routers "
                              "shared: the paper's per-step routers exist for exactly K + 1 steps")


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # Compute layers per pipeline stage (the looped core counts C*K); None = balanced by compute.
    # With interleaving there is one entry per model chunk (PP x V chunks).
    pipeline_split: Optional[list[int]] = None
    # Model chunks per pipeline rank (megatron's interleaved 1F1B); None = plain 1F1B.
    virtual_pipeline_model_parallel_size: Optional[int] = None

    @property
    def pipeline_chunks(self) -> int:
        return self.pipeline_model_parallel_size * (self.virtual_pipeline_model_parallel_size or 1)


# --------------------------------------------------------------------------------------
# validate(): the one place that rejects bad configs
# --------------------------------------------------------------------------------------


def _validate_router_init(model: ModelConfig, layout: Layout) -> None:
    if model.mesh_router_init not in MESH_ROUTER_INITS:
        raise ConfigError(f"mesh_router_init {model.mesh_router_init!r} is unknown: choose one of "
                          f"{', '.join(MESH_ROUTER_INITS)}")
    if not model.is_mesh and (model.mesh_router_init != "paper" or model.mesh_router_margin is not None):
        raise ConfigError(f"mesh_router_init/mesh_router_margin are set but variant {model.variant!r} has no "
                          "MeSH routers: drop them or use variant 'mesh'")
    if model.mesh_router_margin is not None and model.mesh_router_init != "base":
        raise ConfigError("mesh_router_margin is set but mesh_router_init is 'paper' (bias 0): the margin is "
                          "the 'base' init's; add mesh_router_init: base or drop the margin")
    if model.mesh_routers not in MESH_ROUTERS:
        raise ConfigError(f"mesh_routers {model.mesh_routers!r} is unknown: choose one of {', '.join(MESH_ROUTERS)}")
    if not model.is_mesh and (model.mesh_routers != "per-step" or model.mesh_step_embedding):
        raise ConfigError(f"mesh_routers/mesh_step_embedding are set but variant {model.variant!r} has no MeSH "
                          "routers: drop them or use variant 'mesh'")
    if model.mesh_routers == "shared" and model.variant != "mesh":
        raise ConfigError("mesh_routers 'shared' needs variant 'mesh' (a shared core): 'vanilla+mesh' has K "
                          "distinct blocks, a fixed depth")
    if model.mesh_step_embedding and model.mesh_routers != "shared":
        raise ConfigError("mesh_step_embedding conditions the shared routers on the step: add mesh_routers: shared "
                          "(--mesh-routers shared); the per-step routers already differ per step")
    if model.mesh_router_init == "base" and model.mesh_routers == "shared":
        raise ConfigError("mesh_router_init 'base' gives each step's own router a fresh slot, which shared "
                          "routers do not have: use mesh_router_init 'paper' with mesh_routers 'shared'")
    if model.mesh_router_init == "base":
        if not model.router_margin > 0:
            raise ConfigError(f"mesh_router_margin={model.router_margin} must be positive (the bias on each "
                              "step's own slot)")
        if model.is_mesh and model.slots < layout.loops + 2:
            raise ConfigError(
                f"mesh_router_init 'base' gives each of the K + 1 = {layout.loops + 1} steps a fresh slot "
                f"after slot 0, which needs mesh_slots >= K + 2 = {layout.loops + 2} (got {model.slots}): "
                "raise mesh_slots or use mesh_router_init 'paper'")


def _validate_relaxation(model: ModelConfig) -> None:
    if not isinstance(model.lora_rank, int) or isinstance(model.lora_rank, bool) or model.lora_rank < 0:
        raise ConfigError(f"lora_rank={model.lora_rank!r} must be an integer >= 0 (0 = no adapters) or "
                          f"'{LORA_FULL}'")
    if model.lora_alpha is not None and (not model.lora_rank or not model.lora_alpha > 0):
        raise ConfigError(f"lora_alpha={model.lora_alpha} needs --lora-rank > 0 and must be positive "
                          "(the adapters are scaled by alpha / rank)")
    if not model.is_relaxed:
        return
    if not model.core_shared or not model.parsed_layout.is_looped:
        raise ConfigError(f"--lora-rank/--relax-biases/--relax-norms relax a shared looped core, but variant "
                          f"{model.variant!r} has none (its layers are already distinct): use a looped "
                          "variant (base, mesh, ...) or drop them")
    limit = min(model.hidden_size, model.ffn_size)
    if model.lora_rank > limit:
        raise ConfigError(f"lora_rank={model.lora_rank} is above full rank {limit} (min of hidden and ffn "
                          f"sizes): use at most {limit}, or '{LORA_FULL}'")
    if model.lora_rank and not model.lora_target_names:
        raise ConfigError(f"lora_rank={model.lora_rank} but lora_targets is empty: name at least one of "
                          f"{', '.join(LORA_TARGETS)}")


def _validate_injection(model: ModelConfig, layout: Layout) -> None:
    if model.input_injection not in INPUT_INJECTIONS:
        raise ConfigError(f"input_injection {model.input_injection!r} is unknown: choose one of "
                          f"{', '.join(INPUT_INJECTIONS)}")
    if model.state_init not in STATE_INITS:
        raise ConfigError(f"state_init {model.state_init!r} is unknown: choose one of {', '.join(STATE_INITS)}")
    if model.input_injection == "none" and model.state_init == "prelude":
        return
    if model.is_mor:
        raise ConfigError("--input-injection/--state-init noise with variant 'mor': MoR's routers gate the state "
                          "itself on the tokens they select; drop them (input-injection none, state-init prelude)")
    if not model.core_shared:
        raise ConfigError(f"--input-injection/--state-init shape a shared loop; variant {model.variant!r} has none "
                          "(vanilla, vanilla+mesh): drop them or use a looped variant")
    if model.state_init == "noise":
        if model.is_mesh:
            raise ConfigError("--state-init noise with variant 'mesh': MeSH's transitional step defines the state "
                              "entering the loop; use --state-init prelude")
        if model.input_injection == "none":
            raise ConfigError("--state-init noise needs --input-injection add or concat-adapter: otherwise the "
                              "prelude's output never reaches the loop")


MOR_DEFAULTS = {"mor_routing": "expert-choice", "mor_capacities": None, "mor_alpha": None,
                "mor_aux_weight": 0.001, "mor_z_loss": 0.0, "mor_kv": "recursion", "mor_balance_weight": None,
                "mor_bias_rate": None}


def _validate_mor(model: ModelConfig) -> None:
    if not model.is_mor:
        changed = [k for k, v in MOR_DEFAULTS.items() if getattr(model, k) != v]
        if changed:
            raise ConfigError(f"{', '.join(changed)} set but variant {model.variant!r} has no MoR routers: drop "
                              "them or use variant 'mor'")
        return
    if model.mor_routing not in MOR_ROUTINGS:
        raise ConfigError(f"mor_routing {model.mor_routing!r} is unknown: choose one of {', '.join(MOR_ROUTINGS)}")
    if model.mor_kv not in MOR_KV_MODES:
        raise ConfigError(f"mor_kv {model.mor_kv!r} is unknown: choose one of {', '.join(MOR_KV_MODES)}")
    if not model.gate_alpha > 0 or model.mor_z_loss < 0:
        raise ConfigError(f"mor_alpha={model.gate_alpha} must be positive and mor_z_loss={model.mor_z_loss} non-negative")
    if model.is_token_choice:
        if model.mor_capacities is not None or model.mor_aux_weight != MOR_DEFAULTS["mor_aux_weight"]:
            raise ConfigError("--mor-capacities/--mor-aux-weight with --mor-routing token-choice: each token picks its "
                              "own depth (no capacities, no top-k BCE); drop them, --mor-balance-weight weighs its loss")
        if model.balance_weight < 0:
            raise ConfigError(f"mor_balance_weight={model.balance_weight} must be non-negative")
        if model.mor_bias_rate is not None and not model.mor_bias_rate > 0:
            raise ConfigError(f"mor_bias_rate={model.mor_bias_rate} must be positive (omit it to turn loss-free "
                              "balancing off)")
        return
    if model.mor_balance_weight is not None or model.mor_bias_rate is not None:
        raise ConfigError("--mor-balance-weight/--mor-bias-rate with --mor-routing expert-choice: expert choice is "
                          "balanced by its capacities; drop them or use --mor-routing token-choice")
    caps, loops = model.capacities, model.parsed_layout.loops
    if len(caps) != loops:
        raise ConfigError(f"mor_capacities has {len(caps)} entries but the layout loops K={loops} times: give "
                          f"one capacity per iteration (e.g. {','.join(f'{(loops - r) / loops:g}' for r in range(loops))})")
    if any(not 0 < c <= 1 for c in caps) or any(b > a for a, b in zip(caps, caps[1:])):
        raise ConfigError(f"mor_capacities {','.join(f'{c:g}' for c in caps)} must lie in (0, 1] and never grow "
                          "(expert choice keeps a subset of the tokens still active): e.g. 1.0,0.5")
    if int(caps[-1] * model.seq_length) < 1:
        raise ConfigError(f"mor_capacities: {caps[-1]:g} x seq_length {model.seq_length} keeps no token at the last "
                          "iteration: raise the capacity")
    if model.mor_aux_weight < 0:
        raise ConfigError(f"mor_aux_weight={model.mor_aux_weight} must be non-negative")


def validate(model: ModelConfig, parallel: Optional[ParallelConfig] = None,
             world_size: Optional[int] = None) -> None:
    """Raise ConfigError naming the first bad field and how to fix it."""
    parallel = parallel or ParallelConfig()
    if model.variant not in VARIANTS:
        raise ConfigError(f"variant {model.variant!r} is unknown: choose one of {', '.join(VARIANTS)}")
    layout = Layout.parse(model.layout)  # raises on a malformed string
    if model.hidden_size <= 0 or model.num_attention_heads <= 0:
        raise ConfigError("hidden_size and num_attention_heads must be positive")
    if model.hidden_size % model.num_attention_heads:
        raise ConfigError(
            f"num_attention_heads={model.num_attention_heads} does not divide hidden_size="
            f"{model.hidden_size}: pick a head count that divides the width"
        )
    rot = model.head_dim * model.rotary_percent
    if not 0 < model.rotary_percent <= 1 or rot != int(rot) or int(rot) % 2:
        raise ConfigError(
            f"rotary_percent={model.rotary_percent} of head_dim={model.head_dim} gives {rot} "
            "rotary dims: it must be a positive even integer"
        )
    if model.variant == "vanilla":
        if model.mesh_slots is not None:
            raise ConfigError(
                "mesh_slots is set but variant is 'vanilla': MeSH options need variant "
                "'mesh' (looped) or 'vanilla+mesh' (buffer between distinct blocks)"
            )
        if layout.compute_depth <= 0:
            raise ConfigError("layout has no layers: give a positive layer count, e.g. '12'")
    else:
        if not layout.is_looped:
            raise ConfigError(
                f"variant {model.variant!r} needs a looped layout P+CrK+Q with C >= 1 and K >= 1, "
                f"got {model.layout!r}; use variant 'vanilla' for a plain stack"
            )
        if not model.is_mesh and model.mesh_slots is not None:
            raise ConfigError(
                f"mesh_slots is set but variant {model.variant!r} has no MeSH buffer: "
                "drop mesh_slots or use variant 'mesh'"
            )
        if model.is_mesh and model.slots < 2:
            raise ConfigError(
                f"mesh_slots={model.slots} is too small: the buffer needs at least 2 slots "
                "(slot 0 holds the embeddings); the paper's default is K + 3"
            )
    _validate_router_init(model, layout)
    _validate_relaxation(model)
    _validate_injection(model, layout)
    _validate_mor(model)
    for name in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(model, name) < 1.0:
            raise ConfigError(f"{name}={getattr(model, name)} must be in [0, 1) (--{name.replace('_', '-')}: "
                              "the probability of dropping a unit; 0 turns dropout off)")
    if model.vocab_size <= 0 or model.seq_length <= 0:
        raise ConfigError("vocab_size and seq_length must be positive")

    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise ConfigError("tensor/pipeline model-parallel sizes must be >= 1")
    if model.num_attention_heads % tp:
        raise ConfigError(
            f"tensor_model_parallel_size={tp} does not divide num_attention_heads="
            f"{model.num_attention_heads}: choose a TP size that divides the head count"
        )
    if model.ffn_size % tp:
        raise ConfigError(f"tensor_model_parallel_size={tp} does not divide ffn_hidden_size={model.ffn_size}")
    if world_size is not None and world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not a multiple of tensor x pipeline parallel "
            f"({tp} x {pp}): launch a multiple of {tp * pp} processes or lower TP/PP"
        )


# --------------------------------------------------------------------------------------
# Presets (docs/MESH_METHOD.md section 4)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    num_attention_heads: int
    vanilla_layers: int
    layouts: tuple[str, ...]  # recursive layouts, first is the default
    vocab_size: int
    seq_length: int


PRESETS: dict[str, Preset] = {
    # Debug flavor: one training step on CPU in well under a second.
    "tiny": Preset(64, 4, 6, ("1+2R2+1",), vocab_size=4096, seq_length=128),
    # Pythia shapes; GPT-NeoX tokenizer (50,257 -> padded 50,304), paper's sequence 4096.
    "pythia-160m": Preset(768, 12, 12, ("2+4R2+2",), vocab_size=50257, seq_length=4096),
    "pythia-410m": Preset(1024, 16, 24, ("4+8R2+4", "3+6R3+3"), vocab_size=50257, seq_length=4096),
    "pythia-1b": Preset(2048, 8, 16, ("3+5R2+3",), vocab_size=50257, seq_length=4096),
    "pythia-1.4b": Preset(2048, 16, 24, ("4+8R2+4",), vocab_size=50257, seq_length=4096),
}


def preset(name: str, variant: str = "mesh", layout: Optional[str] = None, **overrides: Any) -> ModelConfig:
    """The ModelConfig of a named preset and variant.

    `layout` picks one of the preset's recursive layouts (e.g. pythia-410m '3+6R3+3');
    vanilla gets the preset's plain layer count unless a layout is given, in which case
    P+CrK+Q is unrolled into P + C*K + Q distinct layers.
    """
    if name not in PRESETS:
        raise ConfigError(f"preset {name!r} is unknown: choose one of {', '.join(PRESETS)}")
    if variant not in VARIANTS:
        raise ConfigError(f"variant {variant!r} is unknown: choose one of {', '.join(VARIANTS)}")
    p = PRESETS[name]
    if layout is None:
        layout = str(p.vanilla_layers) if variant == "vanilla" else p.layouts[0]
    elif variant == "vanilla":
        layout = str(Layout.parse(layout).compute_depth)
    cfg = ModelConfig(
        hidden_size=p.hidden_size,
        num_attention_heads=p.num_attention_heads,
        layout=layout,
        variant=variant,
        vocab_size=p.vocab_size,
        seq_length=p.seq_length,
    )
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


# --------------------------------------------------------------------------------------
# megatron-core TransformerConfig: the one conversion
# --------------------------------------------------------------------------------------


def to_transformer_config(model: ModelConfig, parallel: Optional[ParallelConfig] = None,
                          params_dtype: torch.dtype = torch.float32,
                          perform_initialization: bool = True):
    """megatron-core's TransformerConfig for the GPT-NeoX layer of this model.

    num_layers is the *compute* depth: megatron uses it only for init scaling and
    bookkeeping, and the paper scales output projections by compute depth.
    Fusions that need CUDA kernels are off unless a GPU is present.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.utils import init_method_normal

    parallel = parallel or ParallelConfig()
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=model.compute_depth,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        ffn_hidden_size=model.ffn_size,
        kv_channels=model.head_dim,
        normalization="LayerNorm",
        layernorm_epsilon=model.layernorm_epsilon,
        add_bias_linear=True,
        add_qkv_bias=True,
        gated_linear_unit=False,
        activation_func=torch.nn.functional.gelu,  # exact GELU, as GPT-NeoX
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method=init_method_normal(model.weight_init_std),
        output_layer_init_method=init_method_normal(model.output_proj_init_std),
        init_method_std=model.weight_init_std,
        # The full weight is drawn on CPU then split, so every TP size starts identical.
        use_cpu_initialization=True,
        perform_initialization=perform_initialization,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        sequence_parallel=False,
        # Pipeline p2p: activations travel in the params dtype; one send/recv at a time
        # (batched isend/irecv gave wrong gradients on gloo with interleaving).
        pipeline_dtype=params_dtype,
        batch_p2p_comm=False,
        deallocate_pipeline_outputs=False,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        microbatch_group_size_per_vp_stage=(parallel.pipeline_model_parallel_size
                                            if parallel.virtual_pipeline_model_parallel_size else None),
        # megatron's fused bias-GELU is the tanh approximation: keep it off for exactness.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=on_gpu,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )


# --------------------------------------------------------------------------------------
# Training, data and logging
# --------------------------------------------------------------------------------------

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainingConfig:
    """Optimizer, schedule, batch and checkpoint settings (Megatron flag names)."""

    micro_batch_size: int = 8
    global_batch_size: int = 16
    train_iters: int = 300
    lr: float = 3e-3
    min_lr: float = 3e-4  # cosine decays to this (the paper: 10% of peak)
    lr_warmup_fraction: float = 0.01
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    precision: str = "fp32"
    seed: int = 1234
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None  # None: save only at the end (when --save is given)
    keep_last: int = 2  # checkpoints kept on disk; older ones are deleted after a save
    eval_interval: int = 50
    eval_iters: int = 4
    log_interval: int = 10
    nan_policy: str = "stop"  # "stop": exit with a message; "skip": drop the step and go on
    sample_tokens: int = 48  # greedy sample printed at the end (0: none)
    sample_prompt: str = "Return the"
    exit_interval: Optional[int] = None  # save and exit when iteration % N == 0 (Megatron's flag)


@dataclass
class DataConfig:
    """Where tokens come from. No data_path: the embedded corpus shipped in the package."""

    data_path: list[str] = field(default_factory=list)  # "[w1] prefix1 [w2] prefix2 ..."
    split: str = "969,30,1"
    tokenizer_type: Optional[str] = None  # "sentencepiece" | "hf"
    tokenizer_model: Optional[str] = None
    cache_dir: Optional[str] = None  # dataset index cache (default ~/.cache/mesh_megatron)


@dataclass
class LoggingConfig:
    tensorboard_dir: Optional[str] = None
    wandb_project: Optional[str] = None
    wandb_mode: str = "offline"  # "online" only when asked
    wandb_dir: Optional[str] = None
    jsonl_path: Optional[str] = None  # one JSON record per log/eval line, for scripts


def validate_training(train: TrainingConfig, data_parallel_size: int) -> None:
    """Batch arithmetic and recipe sanity: global = micro x grad-accum x data-parallel."""
    if train.precision not in PRECISIONS:
        raise ConfigError(f"precision {train.precision!r} is unknown: choose one of {', '.join(PRECISIONS)}")
    if train.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("fp16 needs a GPU (DeepSpeed refuses fp16 on CPU): use --bf16 or fp32")
    if train.micro_batch_size < 1 or train.global_batch_size < 1:
        raise ConfigError("--micro-batch-size and --global-batch-size must be >= 1")
    per_step = train.micro_batch_size * data_parallel_size
    if train.global_batch_size % per_step:
        raise ConfigError(
            f"--global-batch-size {train.global_batch_size} is not a multiple of micro-batch "
            f"{train.micro_batch_size} x data-parallel {data_parallel_size} = {per_step}: "
            "global = micro x grad-accum x data-parallel"
        )
    if train.train_iters < 1:
        raise ConfigError("--train-iters must be >= 1")
    if not 0 <= train.lr_warmup_fraction < 1:
        raise ConfigError("--lr-warmup-fraction must be in [0, 1)")
    if train.min_lr > train.lr:
        raise ConfigError(f"--min-lr {train.min_lr} is above --lr {train.lr}")
    if train.nan_policy not in ("stop", "skip"):
        raise ConfigError(f"--nan-policy {train.nan_policy!r}: choose 'stop' or 'skip'")
    if train.keep_last < 1:
        raise ConfigError("--keep-last must be >= 1")


def gradient_accumulation_steps(train: TrainingConfig, data_parallel_size: int) -> int:
    return train.global_batch_size // (train.micro_batch_size * data_parallel_size)
