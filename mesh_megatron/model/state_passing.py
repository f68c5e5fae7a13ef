"""How the state moves between loop iterations (docs/MESH_METHOD.md sections 2 and 3).

Every variant answers two questions with the same interface:

    h0, carry = sp.start(h_emb, h_pre)           # before the loop (MeSH: transitional step)
    h_next, carry = sp.step(t, h_t, y, carry)    # after iteration t, where y = core(h_t)

States are `[s, b, h]`. `carry` holds whatever the variant keeps during one forward pass
(anchors, or the MeSH buffer); it is an activation, never a parameter or checkpointed.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from mesh_megatron.config import ADDITIVE_SUPPLEMENTS, ModelConfig


class AdditiveStatePassing(nn.Module):
    """h_{t+1} = core(h_t) + supplements: base (), residual (h_t), anchor (h0),
    anchor_emb (h_emb) and their sums. No parameters."""

    def __init__(self, supplements: tuple[str, ...]):
        super().__init__()
        self.supplements = supplements

    def start(self, h_emb: Tensor, h_pre: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return h_pre, {"h0": h_pre, "h_emb": h_emb}

    def step(self, t: int, h_t: Tensor, y: Tensor, carry: dict[str, Tensor]) -> tuple[Tensor, Any]:
        out = y
        for name in self.supplements:
            out = out + (h_t if name == "h_t" else carry[name])
        return out, carry


class LearnedScalarStatePassing(nn.Module):
    """h_{t+1} = a1 * core(h_t) + a2 * h0 + a3 * h_emb with (a1, a2, a3) learned per step."""

    def __init__(self, loops: int, init: tuple[float, float, float]):
        super().__init__()
        self.init_values = tuple(init)
        # [K, 3]: one row (a1, a2, a3) per loop iteration.
        self.scalars = nn.Parameter(torch.empty(loops, 3))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.scalars.copy_(torch.tensor(self.init_values).expand_as(self.scalars))

    def start(self, h_emb: Tensor, h_pre: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return h_pre, {"h0": h_pre, "h_emb": h_emb}

    def step(self, t: int, h_t: Tensor, y: Tensor, carry: dict[str, Tensor]) -> tuple[Tensor, Any]:
        a = self.scalars[t].to(y.dtype)
        return a[0] * y + a[1] * carry["h0"] + a[2] * carry["h_emb"], carry


class Router(nn.Linear):
    """Linear(hidden -> B) + softmax over slots, per token. The softmax runs in fp32
    whatever the training dtype: its output is float32 `[s, b, B]`."""

    def __init__(self, hidden_size: int, slots: int):
        super().__init__(hidden_size, slots, bias=True)

    def reset_parameters(self) -> None:
        # (decided) std sqrt(2 / (B * hidden)), truncated at 3 std, bias 0.
        std = math.sqrt(2.0 / (self.out_features * self.in_features))
        with torch.no_grad():
            nn.init.trunc_normal_(self.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
            nn.init.zeros_(self.bias)

    def forward(self, h: Tensor) -> Tensor:
        return torch.softmax(super().forward(h).float(), dim=-1)


def router_bias(slots: int, step: int, margin: float) -> Tensor:
    """Initial bias `[B]` of step `step`'s write and read routers (step 0 = transitional,
    t + 1 = loop iteration t): 0 for the paper's init (margin 0); `mesh_router_init: base`
    puts +margin on slot step + 1, so step s writes to a slot nothing else writes and reads
    it back: h0 = h_pre, h_{t+1} = y_t, the base recursion, up to the non-target mass
    (B - 1) / (e^margin + B - 1) of each softmax (at zero router weights)."""
    bias = torch.zeros(slots)
    if margin:
        bias[step + 1] = margin
    return bias


class MeshCarry(NamedTuple):
    """What MeSH keeps during one forward: slot 0's content and every write so far.

    The buffer itself is never materialised (see MeshStatePassing)."""

    h_emb: Tensor  # [s, b, h], slot 0's initial content
    values: list[Tensor]  # [s, b, h] per write: h_pre, then y_0 .. y_{t}
    writes: list[Tensor]  # [s, b, B] fp32 write weights of each write


class MeshStatePassing(nn.Module):
    """MeSH: a buffer of B slots with a write and a read router per step.

    Step 0 is the transitional step (routers read h_pre), step t+1 is loop iteration t
    (routers read h_t, the state entering the core). Writes are additive: m_b += w_b * y;
    the read after the write is the next state. Buffer: `[B, s, b, h]`, m_0 = h_emb.

    Memory: stored as a tensor, the buffer costs one `[B, s, b, h]` copy per step kept for
    backward (the read's gradient needs it): (K + 1) * B hidden states beyond the base
    recursion. Because writes are additive, the buffer after write j is linear in what was
    written,

        m_b = [b == 0] h_emb + sum_{i<=j} w_{i,b} v_i
        read(r) = sum_b r_b m_b = r_0 h_emb + sum_{i<=j} (r . w_i) v_i,

    so the read is computed from the per-token scalars c_i = r . w_i (fp32, `[s, b, 1]`) and
    the written values themselves. Kept for backward: h_emb and the K + 1 written values,
    nothing `[B, ...]`. Same math as the buffer form (hf/modeling_mesh.py keeps that form,
    read top to bottom); the sums run in another order, so they agree to rounding.
    """

    def __init__(self, hidden_size: int, slots: int, loops: int, router_margin: float = 0.0):
        super().__init__()
        self.slots = slots
        self.write_routers = nn.ModuleList(Router(hidden_size, slots) for _ in range(loops + 1))
        self.read_routers = nn.ModuleList(Router(hidden_size, slots) for _ in range(loops + 1))
        if router_margin:  # mesh_router_init: base (the training model's init redraws the same)
            with torch.no_grad():
                for step, routers in enumerate(zip(self.write_routers, self.read_routers)):
                    for router in routers:
                        router.bias.copy_(router_bias(slots, step, router_margin))

    def route(self, step: int, router_input: Tensor) -> tuple[Tensor, Tensor]:
        """(write, read) weights `[s, b, B]` fp32 of step `step`: its own router pair."""
        return self.write_routers[step](router_input), self.read_routers[step](router_input)

    def _write_read(self, step: int, router_input: Tensor, value: Tensor, carry: MeshCarry) -> tuple[Tensor, MeshCarry]:
        w, r = self.route(step, router_input)  # [s, b, B] fp32 each
        carry = MeshCarry(carry.h_emb, carry.values + [value], carry.writes + [w])  # write, then read
        out = r[..., :1].to(value.dtype) * carry.h_emb.to(value.dtype)
        for v, w_i in zip(carry.values, carry.writes):
            # out += c_i * v_i, one fused kernel: [s, b, h] + [s, b, 1] * [s, b, h]
            out = torch.addcmul(out, (r * w_i).sum(dim=-1, keepdim=True).to(v.dtype), v)
        return out, carry

    def start(self, h_emb: Tensor, h_pre: Tensor) -> tuple[Tensor, MeshCarry]:
        return self._write_read(0, h_pre, h_pre, MeshCarry(h_emb, [], []))

    def step(self, t: int, h_t: Tensor, y: Tensor, carry: MeshCarry) -> tuple[Tensor, MeshCarry]:
        return self._write_read(t + 1, h_t, y, carry)


class SharedMeshStatePassing(MeshStatePassing):
    """MeSH at any depth (`mesh_routers: shared`): router pair 0 for the transitional step,
    pair 1 shared by every loop iteration, so no parameter fixes K. With `mesh_step_embedding`
    the shared routers read h_t + e_t, a learned step embedding ([B, h], iteration t uses row
    min(t, B - 1); zeros at init), like Inner Thinking Transformer's step encoding. The buffer
    and its memory-saving read are MeshStatePassing's; past B - 2 loop iterations writes land in
    slots already written (B stays a free parameter). Parameters: 2 * 2 * (h B + B) + B h."""

    def __init__(self, hidden_size: int, slots: int, step_embedding: bool = False):
        super().__init__(hidden_size, slots, loops=1)
        self.step_embedding = nn.Parameter(torch.zeros(slots, hidden_size)) if step_embedding else None

    def route(self, step: int, router_input: Tensor) -> tuple[Tensor, Tensor]:
        pair = min(step, 1)
        if step and self.step_embedding is not None:
            router_input = router_input + self.step_embedding[min(step - 1, self.slots - 1)].to(router_input.dtype)
        return self.write_routers[pair](router_input), self.read_routers[pair](router_input)


def build_state_passing(config: ModelConfig) -> nn.Module:
    """The state-passing module of a looped (or vanilla+mesh) model."""
    layout = config.parsed_layout
    if config.is_mesh and config.mesh_routers == "shared":
        return SharedMeshStatePassing(config.hidden_size, config.slots, config.mesh_step_embedding)
    if config.is_mor:
        from mesh_megatron.model.mor import MoRStatePassing
        from mesh_megatron.model.mor_token import MoRTokenChoice

        return MoRTokenChoice(config) if config.is_token_choice else MoRStatePassing(config)
    if config.is_mesh:
        return MeshStatePassing(config.hidden_size, config.slots, layout.loops, config.router_margin)
    if config.variant == "learned":
        return LearnedScalarStatePassing(layout.loops, config.learned_scalar_init)
    return AdditiveStatePassing(ADDITIVE_SUPPLEMENTS[config.variant])
