"""How the state moves between loop iterations (docs/MESH_METHOD.md sections 2 and 3).

Every variant answers two questions with the same interface:

    h0, carry = sp.start(h_emb, h_pre)           # before the loop (MeSH: transitional step)
    h_next, carry = sp.step(t, h_t, y, carry)    # after iteration t, where y = core(h_t)

States are `[s, b, h]`. `carry` holds whatever the variant keeps during one forward pass
(anchors, or the MeSH buffer); it is an activation, never a parameter or checkpointed.
"""

from __future__ import annotations

import math
from typing import Any

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


class MeshStatePassing(nn.Module):
    """MeSH: a buffer of B slots with a write and a read router per step.

    Step 0 is the transitional step (routers read h_pre), step t+1 is loop iteration t
    (routers read h_t, the state entering the core). Writes are additive: m_b += w_b * y;
    the read after the write is the next state. Buffer: `[B, s, b, h]`, m_0 = h_emb.
    """

    def __init__(self, hidden_size: int, slots: int, loops: int):
        super().__init__()
        self.slots = slots
        self.write_routers = nn.ModuleList(Router(hidden_size, slots) for _ in range(loops + 1))
        self.read_routers = nn.ModuleList(Router(hidden_size, slots) for _ in range(loops + 1))

    def _write_read(self, step: int, router_input: Tensor, value: Tensor, buffer: Tensor) -> tuple[Tensor, Tensor]:
        # [s, b, B] fp32 -> [B, s, b, 1] in the buffer's dtype, so it scales whole slots.
        w = self.write_routers[step](router_input).to(value.dtype).permute(2, 0, 1).unsqueeze(-1)
        r = self.read_routers[step](router_input).to(value.dtype).permute(2, 0, 1).unsqueeze(-1)
        buffer = buffer + w * value.unsqueeze(0)  # additive write, nothing overwritten
        return (r * buffer).sum(dim=0), buffer  # read after the write: [s, b, h]

    def start(self, h_emb: Tensor, h_pre: Tensor) -> tuple[Tensor, Tensor]:
        buffer = torch.zeros((self.slots, *h_emb.shape), dtype=h_pre.dtype, device=h_pre.device)
        buffer = torch.cat([h_emb.to(h_pre.dtype).unsqueeze(0), buffer[1:]], dim=0)  # m_0 = h_emb
        return self._write_read(0, h_pre, h_pre, buffer)

    def step(self, t: int, h_t: Tensor, y: Tensor, buffer: Tensor) -> tuple[Tensor, Tensor]:
        return self._write_read(t + 1, h_t, y, buffer)


def build_state_passing(config: ModelConfig) -> nn.Module:
    """The state-passing module of a looped (or vanilla+mesh) model."""
    layout = config.parsed_layout
    if config.is_mesh:
        return MeshStatePassing(config.hidden_size, config.slots, layout.loops)
    if config.variant == "learned":
        return LearnedScalarStatePassing(layout.loops, config.learned_scalar_init)
    return AdditiveStatePassing(ADDITIVE_SUPPLEMENTS[config.variant])
