"""Parameter counts and training FLOPs per token (docs/MESH_METHOD.md sections 3b and 4).

Counts come from a built module (any device, including meta); FLOPs from the config,
with the one convention used everywhere (summary, training log, benchmarks):

    flops/token = 6 * N_applied + 12 * L_compute * hidden * seq        (forward + backward)
    N_applied   = L_compute * 12 * hidden^2 + (K+1) * 2 * hidden * B + hidden * padded_vocab
                  + K * C * r * sum over LoRA targets of (in + out)          (relaxed sharing)

Every loop iteration is counted: a core of C layers run K times costs C*K layers. Under
Mixture-of-Recursions (model/mor.py, docs/MESH_METHOD.md section 9) iteration r runs on
k_r = int(capacity_r * s) of the s tokens, so it counts f_r = k_r / s of a layer per token for the
matmuls and f_r^2 for attention (a sequence of k_r tokens: k_r^2 scores, shared by s tokens), and
its router h -> 1 runs on all:

    L_matmul    = P + Q + C * sum_r f_r        L_attention = P + Q + C * sum_r f_r^2
    N_applied   = L_matmul * 12 * hidden^2 + K * hidden + hidden * padded_vocab (+ f_r-weighted LoRA)

With every f_r = 1 these are the formulas above (MoR runs exactly its K iterations). Relaxed
sharing (model/relaxation.py, docs/MESH_METHOD.md section 8) holds one adapter per loop
position, each applied once per token, so its parameters and its N_applied term are equal:

    adapter params = K * C * r * sum_targets (in + out)        qkv 4h, dense 2h, fc1 and fc2 h + ffn
    delta params   = K * C * (9h or h*5 + ffn biases if relax_biases, + 4h if relax_norms)

Under a random recurrence or truncated backprop (model/recurrence.py) the iterations executed count:
forward of all n, backward of the last g = min(n, k) (flops_per_token, step_flops_per_token).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from torch import nn

from mesh_megatron.config import ModelConfig

EMBEDDING_PREFIXES = ("embedding.", "output_layer.")
ROUTER_MARKERS = (".write_routers.", ".read_routers.", ".step_embedding", "state_passing.routers.", "state_passing.router.")  # MeSH; MoR (expert, token choice)
ADAPTER_SUFFIXES = (".lora_A", ".lora_B")
DELTA_SUFFIXES = ("_delta",)


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    embedding: int  # input embedding + output layer (untied)
    non_embedding: int  # all layers, routers and the final LayerNorm
    router: int  # MeSH write + read routers (and the shared routers' step embedding), or MoR's routers
    adapter: int = 0  # relaxed sharing: LoRA A and B of every loop position
    delta: int = 0  # relaxed sharing: per-position bias and LayerNorm deltas

    @classmethod
    def of(cls, model: nn.Module) -> "ParameterCounts":
        total = embedding = router = adapter = delta = 0
        for name, p in model.named_parameters():
            total += p.numel()
            if name.startswith(EMBEDDING_PREFIXES):
                embedding += p.numel()
            elif any(marker in name for marker in ROUTER_MARKERS):
                router += p.numel()
            elif name.endswith(ADAPTER_SUFFIXES):
                adapter += p.numel()
            elif name.endswith(DELTA_SUFFIXES):
                delta += p.numel()
        return cls(total=total, embedding=embedding, non_embedding=total - embedding, router=router,
                   adapter=adapter, delta=delta)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _target_widths(config: ModelConfig) -> dict[str, int]:
    """in + out of each LoRA target (Pythia names)."""
    h, f = config.hidden_size, config.ffn_size
    return {"query_key_value": 4 * h, "dense": 2 * h, "dense_h_to_4h": h + f, "dense_4h_to_h": f + h}


def adapter_params_per_position(config: ModelConfig) -> int:
    """LoRA parameters of one loop iteration (C core layers): C * r * sum_targets (in + out)."""
    if not config.lora_rank:
        return 0
    widths = _target_widths(config)
    return config.parsed_layout.core * config.lora_rank * sum(widths[t] for t in config.lora_target_names)


def adapter_params(config: ModelConfig) -> int:
    return config.parsed_layout.loops * adapter_params_per_position(config)


def delta_params(config: ModelConfig) -> int:
    """Per-position bias deltas (qkv 3h, dense h, fc1 ffn, fc2 h) and norm deltas (2 x 2h)."""
    h, f = config.hidden_size, config.ffn_size
    per_layer = (5 * h + f if config.relax_biases else 0) + (4 * h if config.relax_norms else 0)
    layout = config.parsed_layout
    return layout.loops * layout.core * per_layer


def processed_fractions(config: ModelConfig, seq_length: Optional[int] = None,
                        measured: Optional[Sequence[float]] = None) -> tuple[float, ...]:
    """Per loop iteration, the fraction of the tokens the core processes: k_r / s under MoR
    (k_r = max(1, int(capacity_r * s)), as model/mor.py keeps), 1 otherwise. Token choice
    (model/mor_token.py): `measured`, what a step's recursions ran on (the training log passes the
    step's, padding included), else the expectation at uniform depths, (K - r) / K (a router at
    init; the routed counts move with training)."""
    layout = config.parsed_layout
    if not config.is_mor:
        return (1.0,) * layout.loops
    if config.is_token_choice:
        if measured is not None:
            return tuple(float(x) for x in measured)
        return tuple((layout.loops - r) / layout.loops for r in range(layout.loops))
    from mesh_megatron.model.mor import keep_count

    seq = seq_length or config.seq_length
    return tuple(keep_count(c, seq) / seq for c in config.capacities)


def effective_depths(config: ModelConfig, seq_length: Optional[int] = None,
                     measured: Optional[Sequence[float]] = None) -> tuple[float, float]:
    """(layers per token for the matmuls, for attention): P + C*K + Q without MoR."""
    layout = config.parsed_layout
    if not config.is_mor:
        return float(config.compute_depth), float(config.compute_depth)
    f = processed_fractions(config, seq_length, measured)
    outer = layout.prelude + layout.coda
    return outer + layout.core * sum(f), outer + layout.core * sum(x * x for x in f)


def applied_matmul_params(config: ModelConfig, tensor_parallel_size: int = 1,
                          seq_length: Optional[int] = None, measured: Optional[Sequence[float]] = None) -> float:
    """Matrix-multiply weights counted once per application (N_applied), per token."""
    h = config.hidden_size
    layers = effective_depths(config, seq_length, measured)[0] * 12 * h * h
    loops = config.parsed_layout.loops
    routers = (loops + 1) * 2 * h * config.slots if config.is_mesh else loops * h if config.is_mor else 0
    f = processed_fractions(config, seq_length, measured)
    adapters = sum(f) * adapter_params_per_position(config)
    applied = layers + routers + adapters + h * config.padded_vocab_size(tensor_parallel_size)
    return int(applied) if applied == int(applied) else applied


def flops_per_token(config: ModelConfig, seq_length: Optional[int] = None, tensor_parallel_size: int = 1,
                    iterations: Optional[float] = None, with_grad: Optional[float] = None) -> float:
    """Forward + backward FLOPs per token of a forward that runs `iterations` loop iterations
    (default K) and backpropagates through the last `with_grad` of them (default all):

        forward  = 2 * N_fwd + 4 * L_fwd * hidden * seq,   backward = 2 x (the same over L_bwd)
        L_fwd    = P + Q + C * n,      L_bwd = P + Q + C * g      (n = iterations, g = with_grad)

    with the routers' (n + 1) and (g + 1) steps and the LoRA adapters of the n (g) iterations
    run; prelude, coda and the output layer always run both. At n = g = K this is training_flops_per_token
    (MoR: only n = g = K, its effective depths). Linear in (n, g), so the expected
    FLOPs of a random recurrence are those at (E[n], E[g])."""
    layout = config.parsed_layout
    n = layout.loops if iterations is None else iterations
    g = n if with_grad is None else with_grad
    if config.is_mor:  # capacities are one per iteration of exactly K: the effective depths at K
        if n != layout.loops or g != layout.loops:
            raise ValueError(f"variant 'mor' runs exactly K={layout.loops} iterations with gradient through all "
                             f"(asked n={n}, g={g})")
        return training_flops_per_token(config, seq_length, tensor_parallel_size)
    h, seq = config.hidden_size, seq_length or config.seq_length
    outside = config.compute_depth - layout.core * layout.loops  # P + Q (vanilla: every layer)
    l_fwd, l_bwd = outside + layout.core * n, outside + layout.core * g
    router = 2 * h * config.slots if config.is_mesh else 0
    head = h * config.padded_vocab_size(tensor_parallel_size)
    adapter = adapter_params_per_position(config)  # one iteration's LoRA matmuls (relaxed sharing)
    fwd = 12 * h * h * l_fwd + (n + 1) * router + n * adapter + head
    bwd = 12 * h * h * l_bwd + (g + 1) * router + g * adapter + head
    return 2 * fwd + 4 * bwd + 4 * h * seq * l_fwd + 8 * h * seq * l_bwd


def training_flops_per_token(config: ModelConfig, seq_length: Optional[int] = None,
                             tensor_parallel_size: int = 1, measured: Optional[Sequence[float]] = None) -> int:
    """Forward + backward FLOPs per token, PaLM-style, no credit for causal masking. `measured`:
    token choice's processed fractions as a step ran them (processed_fractions)."""
    seq = seq_length or config.seq_length
    attention = 12 * effective_depths(config, seq, measured)[1] * config.hidden_size * seq
    return round(6 * applied_matmul_params(config, tensor_parallel_size, seq, measured) + attention)


def expected_flops_per_token(config: ModelConfig, recurrence, seq_length: Optional[int] = None,
                             tensor_parallel_size: int = 1) -> float:
    """Mean training FLOPs per token under a recurrence (model/recurrence.py): at (E[n], E[g])."""
    from mesh_megatron.model.recurrence import expected_iterations

    n, g = expected_iterations(recurrence, config.parsed_layout.loops)
    return flops_per_token(config, seq_length, tensor_parallel_size, n, g)


def step_flops_per_token(config: ModelConfig, recurrence, iteration: int, micro_batches: int,
                         seq_length: Optional[int] = None, tensor_parallel_size: int = 1) -> float:
    """FLOPs per token of training step `iteration` as executed: the mean over its micro-batches
    of each one's drawn (n, g) (every data-parallel rank draws the same for its i-th)."""
    from mesh_megatron.model.recurrence import loop_plan

    loops = config.parsed_layout.loops
    total = 0.0
    for i in range(micro_batches):
        plan = loop_plan(recurrence, loops, (iteration, i), training=True)
        total += flops_per_token(config, seq_length, tensor_parallel_size, plan.iterations, plan.with_grad)
    return total / micro_batches
