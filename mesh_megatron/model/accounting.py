"""Parameter counts and training FLOPs per token (docs/MESH_METHOD.md sections 3b and 4).

Counts come from a built module (any device, including meta); FLOPs from the config,
with the one convention used everywhere (summary, training log, benchmarks):

    flops/token = 6 * N_applied + 12 * L_compute * hidden * seq        (forward + backward)
    N_applied   = L_compute * 12 * hidden^2 + (K+1) * 2 * hidden * B + hidden * padded_vocab

Every loop iteration is counted: a core of C layers run K times costs C*K layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from torch import nn

from mesh_megatron.config import ModelConfig

EMBEDDING_PREFIXES = ("embedding.", "output_layer.")
ROUTER_MARKERS = (".write_routers.", ".read_routers.")


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    embedding: int  # input embedding + output layer (untied)
    non_embedding: int  # all layers, routers and the final LayerNorm
    router: int  # MeSH write + read routers

    @classmethod
    def of(cls, model: nn.Module) -> "ParameterCounts":
        total = embedding = router = 0
        for name, p in model.named_parameters():
            total += p.numel()
            if name.startswith(EMBEDDING_PREFIXES):
                embedding += p.numel()
            elif any(marker in name for marker in ROUTER_MARKERS):
                router += p.numel()
        return cls(total=total, embedding=embedding, non_embedding=total - embedding, router=router)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def applied_matmul_params(config: ModelConfig, tensor_parallel_size: int = 1) -> int:
    """Matrix-multiply weights counted once per application (N_applied)."""
    h, L = config.hidden_size, config.compute_depth
    layers = L * 12 * h * h
    loops = config.parsed_layout.loops
    routers = (loops + 1) * 2 * h * config.slots if config.is_mesh else 0
    return layers + routers + h * config.padded_vocab_size(tensor_parallel_size)


def training_flops_per_token(config: ModelConfig, seq_length: Optional[int] = None,
                             tensor_parallel_size: int = 1) -> int:
    """Forward + backward FLOPs per token, PaLM-style, no credit for causal masking."""
    seq = seq_length or config.seq_length
    attention = 12 * config.compute_depth * config.hidden_size * seq
    return 6 * applied_matmul_params(config, tensor_parallel_size) + attention
