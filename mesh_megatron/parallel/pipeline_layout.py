"""Pipeline stage layout for recursive models: a stage owns whole pieces.

Pieces, in execution order:  prelude layer 0 .. P-1 | the looped core | coda layer 0 .. Q-1.
The core (all K iterations, its routers and the MeSH buffer) is ONE piece: its shared
weights are never split across stages and no iteration crosses a boundary. A vanilla
model is P plain layers; `vanilla+mesh` keeps its K distinct blocks in the core piece
because the buffer lives across them.

The automatic split balances compute: a core of C layers run K times costs C*K layers,
the output layer costs 2*h*V / (24*h^2 + 4*h*s) layers (its matmul against one layer's
forward FLOPs per token), the embedding lookup costs nothing. The first stage always holds
the embedding and the last the final norm and output layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

from mesh_megatron.config import ConfigError, ModelConfig

# Variants whose core reads the scaled embeddings (MeSH slot 0, anchor_emb, learned a3).
USES_EMBEDDINGS_IN_CORE = ("mesh", "vanilla+mesh", "anchor_emb", "anchor+anchor_emb", "learned")


@dataclass(frozen=True)
class Piece:
    kind: str  # "prelude" | "core" | "coda"
    index: int  # layer index within prelude/coda; 0 for the core
    layers: int  # compute layers (the core: C*K)


@dataclass
class Stage:
    rank: int
    prelude: list[int] = field(default_factory=list)  # global prelude layer indices
    core: bool = False
    coda: list[int] = field(default_factory=list)
    pre_process: bool = False  # embedding
    post_process: bool = False  # final norm + output layer
    receives_embeddings: bool = False  # input is [h; h_emb] stacked on the sequence dim
    sends_embeddings: bool = False

    @property
    def compute_layers(self) -> int:
        return len(self.prelude) + len(self.coda)  # the core is added by the layout

    def describe(self, core_layers: int) -> str:
        parts = []
        if self.pre_process:
            parts.append("embedding")
        if self.prelude:
            parts.append(f"prelude {self.prelude[0]}-{self.prelude[-1]}")
        if self.core:
            parts.append(f"core ({core_layers} compute layers)")
        if self.coda:
            parts.append(f"coda {self.coda[0]}-{self.coda[-1]}")
        if self.post_process:
            parts.append("final norm + output layer")
        return ", ".join(parts)


def pieces(model: ModelConfig) -> list[Piece]:
    layout = model.parsed_layout
    out = [Piece("prelude", i, 1) for i in range(layout.prelude)]
    if layout.is_looped:
        out.append(Piece("core", 0, layout.core * layout.loops))
    out += [Piece("coda", i, 1) for i in range(layout.coda)]
    return out


def output_layer_cost(model: ModelConfig) -> float:
    h, s = model.hidden_size, model.seq_length
    return 2 * h * model.padded_vocab_size() / (24 * h * h + 4 * h * s)


def _best_split(weights: list[float], stages: int) -> list[int]:
    """Piece counts per stage (contiguous, each >= 1) minimising the largest stage cost, ties
    broken by the sum of squared stage costs (so stages other than the slowest balance too)."""
    n = len(weights)
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)

    @lru_cache(maxsize=None)
    def best(start: int, k: int) -> tuple[tuple[float, float], tuple[int, ...]]:
        if k == 1:
            cost = prefix[n] - prefix[start]
            return (cost, cost * cost), (n - start,)
        result = ((float("inf"), float("inf")), ())
        for end in range(start + 1, n - k + 2):
            (rest_max, rest_sq), rest = best(end, k - 1)
            cost = prefix[end] - prefix[start]
            key = (max(cost, rest_max), cost * cost + rest_sq)
            if key < result[0]:
                result = (key, (end - start, *rest))
        return result

    return list(best(0, stages)[1])


@dataclass
class PipelineLayout:
    model: ModelConfig
    stages: list[Stage]

    @property
    def embeddings_cross(self) -> bool:
        return any(s.sends_embeddings for s in self.stages)

    @property
    def core_layers(self) -> int:
        layout = self.model.parsed_layout
        return layout.core * layout.loops if layout.is_looped else 0

    def stage_compute(self, stage: Stage) -> float:
        """Stage cost in layer units (output layer included)."""
        cost = stage.compute_layers + (self.core_layers if stage.core else 0)
        return cost + (output_layer_cost(self.model) if stage.post_process else 0.0)

    def shares(self) -> list[float]:
        costs = [self.stage_compute(s) for s in self.stages]
        return [c / sum(costs) for c in costs]

    def ideal_bubble(self, micro_batches: int) -> float:
        """1F1B bubble with the slowest stage setting the pace: (p-1)/(m+p-1) at balance."""
        p = len(self.stages)
        costs = [self.stage_compute(s) for s in self.stages]
        step = (micro_batches + p - 1) * max(costs)
        return 1.0 - micro_batches * sum(costs) / (p * step)

    def boundary_bytes(self, micro_batch: int, bytes_per_value: int = 2) -> list[int]:
        """Bytes sent forward across each boundary per micro-batch ([s, b, h] or [2s, b, h])."""
        h, s = self.model.hidden_size, self.model.seq_length
        return [s * micro_batch * h * (2 if st.sends_embeddings else 1) * bytes_per_value
                for st in self.stages[:-1]]

    def report(self, micro_batches: int = 8) -> str:
        lines = []
        for st, share in zip(self.stages, self.shares()):
            lines.append(f"  stage {st.rank}: {share * 100:5.1f}% of compute | {st.describe(self.core_layers)}"
                         + (" | sends [h, h_emb]" if st.sends_embeddings else ""))
        lines.append(f"  ideal 1F1B bubble with {micro_batches} micro-batches: "
                     f"{self.ideal_bubble(micro_batches) * 100:.1f}%")
        return "\n".join(lines)


def build_layout(model: ModelConfig, stages: int, split: Optional[list[int]] = None,
                 uniform_boundaries: bool = False) -> PipelineLayout:
    """Assign pieces to `stages` stages (or model chunks): balanced by compute, or by `split`
    (compute layers per stage, the core counting C*K), refusing a split that cuts the core or
    leaves a stage empty. `uniform_boundaries` (interleaved schedule, one tensor shape for
    every boundary): when any boundary carries the embeddings, all of them do."""
    ps = pieces(model)
    if stages < 1:
        raise ConfigError("--pipeline-model-parallel-size must be >= 1")
    if stages > len(ps):
        raise ConfigError(
            f"{stages} pipeline model chunks (--pipeline-model-parallel-size x "
            f"--virtual-pipeline-model-parallel-size) are more than the {len(ps)} pieces of layout "
            f"{model.parsed_layout} (each prelude/coda layer is one piece, the looped core is one): "
            "use fewer stages or chunks, or a layout with more prelude/coda layers")
    if split is None:
        weights = [float(p.layers) for p in ps]
        weights[-1] += output_layer_cost(model)
        counts = _best_split(weights, stages)
    else:
        counts = _counts_from_split(ps, split, stages, model)
    layout_stages, i = [], 0
    needs_emb = model.variant in USES_EMBEDDINGS_IN_CORE
    core_stage = None
    for rank, count in enumerate(counts):
        st = Stage(rank=rank, pre_process=rank == 0, post_process=rank == stages - 1)
        for piece in ps[i:i + count]:
            if piece.kind == "core":
                st.core, core_stage = True, rank
            else:
                getattr(st, piece.kind).append(piece.index)
        i += count
        layout_stages.append(st)
    if needs_emb and core_stage:  # the core is not on the first stage
        last = core_stage if not uniform_boundaries else stages - 1
        for st in layout_stages:
            st.receives_embeddings = 0 < st.rank <= last
            st.sends_embeddings = st.rank < last
    return PipelineLayout(model, layout_stages)


def _counts_from_split(ps: list[Piece], split: list[int], stages: int, model: ModelConfig) -> list[int]:
    if len(split) != stages:
        raise ConfigError(f"--pipeline-split names {len(split)} stages but --pipeline-model-parallel-size "
                          f"is {stages}: give one layer count per stage")
    if any(n <= 0 for n in split):
        raise ConfigError(f"--pipeline-split {','.join(map(str, split))} leaves a stage empty: "
                          "every stage needs at least one layer")
    total = sum(p.layers for p in ps)
    if sum(split) != total:
        raise ConfigError(f"--pipeline-split {','.join(map(str, split))} sums to {sum(split)}, but layout "
                          f"{model.parsed_layout} has {total} compute layers")
    counts, i = [], 0
    start = 0
    for stage, n in enumerate(split):
        taken, count = 0, 0
        while taken < n:
            piece = ps[i]
            if taken + piece.layers > n:
                raise ConfigError(
                    f"--pipeline-split {','.join(map(str, split))} would split the looped core "
                    f"(compute layers {start + taken}..{start + taken + piece.layers - 1}) across stages "
                    f"{stage} and {stage + 1}: the shared core and all its iterations must sit on one "
                    "stage; move the boundary before or after it")
            taken += piece.layers
            count += 1
            i += 1
        start += n
        counts.append(count)
    return counts


def parse_split(text: Optional[str]) -> Optional[list[int]]:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"--pipeline-split {text!r}: write comma-separated layer counts, e.g. 4,16,4") from None
