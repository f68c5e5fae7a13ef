"""Mixture-of-Recursions: which tokens loop iteration r processes (arXiv 2507.10524).

Expert-choice routing (the paper's section 2.2.1, docs/MESH_METHOD.md section 9). At
iteration r a router Linear(h -> 1) of its own scores every token still active,

    g_r = alpha * sigmoid(w_r . h_r + b_r)                                  [s, b]

and keeps the top k_r = int(capacity_r * s) of them per sequence (ties: the lower position
first, so every tensor-parallel rank, which holds the same replicated h, keeps the same ones).
The kept tokens, gathered in causal order with their own rotary rows, are one shorter sequence
[k_r, b, h] through the shared core: causal attention among them only. The update is the
paper's eq. (2.1), which the reference implements as a scatter-add,

    h_{r+1} = h_r + g_r * f(h_r)    at the kept tokens;   h_{r+1} = h_r elsewhere,

with f the whole core (its layers carry their own residual, as the reference's decoder
layers do). A token dropped at r is never a candidate again (hierarchical filtering).

Top-k looks at the whole sequence, which generation cannot, so the router is trained to
predict its own top-k: the auxiliary loss is the BCE of the router logits against membership,
over the tokens active at r, plus optionally the router z-loss (logit^2; one logit, so its
logsumexp is itself). Both arise on the stage that holds the core: they reach backward through
megatron-core's MoEAuxLossAutoScaler attached to the loop's output (identity forward; backward
adds d(aux) = the main loss's scale), so pipeline parallelism needs nothing else, and the
step strategies set that scale to 1 / micro-batches, as they scale the LM loss.

The module is the variant's state passing: `start`/`step` as the others, plus `select`, which
RecursiveBlock calls before running the core on what it returns. Token choice (one router,
a depth per token) is model/mor_token.py, with the same interface.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mesh_megatron.config import ModelConfig


class Routing(NamedTuple):
    """One iteration's choice: kept positions [k, b] in causal order, their gate [k, b] (fp32),
    the router logits [s, b] (fp32) and which tokens were candidates [s, b] (bool)."""

    index: Tensor
    gate: Tensor
    logits: Tensor
    active: Tensor


class MoRCarry(NamedTuple):
    active: Optional[Tensor]  # [s, b] bool, tokens still active (None before iteration 0: all)
    routing: Optional[Routing]  # this iteration's, between select() and step()
    aux: list[Tensor]  # per iteration: (bce, z) fp32 scalars


def keep_count(capacity: float, seq: int) -> int:
    """Tokens iteration r keeps per sequence: the reference's max(1, int(capacity * seq))."""
    return max(1, int(capacity * seq))


def top_tokens(scores: Tensor, active: Optional[Tensor], k: int) -> Tensor:
    """The k best active positions per sequence [k, b], ascending (causal) order. `scores` [s, b];
    a stable descending sort breaks ties by position, the same on every rank."""
    if active is not None:
        scores = scores.masked_fill(~active, float("-inf"))
    order = torch.sort(scores, dim=0, descending=True, stable=True).indices[:k]
    return order.sort(dim=0).values


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x [s, b, ...] -> [k, b, ...] at index [k, b]."""
    shape = index.shape + (1,) * (x.dim() - 2)
    return x.gather(0, index.view(shape).expand(-1, -1, *x.shape[2:]))


def gather_rotary(rotary: Tensor, index: Tensor) -> Tensor:
    """The rotary rows of the kept tokens: [s, 1, 1, d] -> [k, b, 1, d] (each its own position)."""
    return rotary[:, 0, 0][index].unsqueeze(2)


def gather_mask(mask: Optional[Tensor], index: Tensor) -> Optional[Tensor]:
    """megatron's [b, 1, s, s] mask restricted to the kept rows and columns: [b, 1, k, k]."""
    if mask is None:
        return None
    idx = index.t()  # [b, k]
    rows = mask.gather(2, idx[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3]))
    return rows.gather(3, idx[:, None, None, :].expand(-1, mask.shape[1], idx.shape[1], -1))


def aux_losses(routing: Routing) -> tuple[Tensor, Tensor]:
    """(BCE of the logits against top-k membership, z-loss), means over the active tokens."""
    target = torch.zeros_like(routing.logits).scatter_(0, routing.index, 1.0)
    logits, target = routing.logits[routing.active], target[routing.active]
    return F.binary_cross_entropy_with_logits(logits, target), (logits ** 2).mean()


class AuxLossScale:
    """The scale MoEAuxLossAutoScaler gives the auxiliary loss's gradient: the LM loss's own."""

    @staticmethod
    def set(scale: float) -> None:
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(float(scale)))


def attach_aux_loss(h: Tensor, aux: Tensor) -> Tensor:
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    return MoEAuxLossAutoScaler.apply(h, aux)


class MoRStatePassing(nn.Module):
    """Expert-choice MoR: routers `routers.{r}` (Linear h -> 1, fp32 logits), capacities per r."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.capacities = config.capacities
        self.alpha = config.gate_alpha
        self.aux_weight, self.z_weight = config.mor_aux_weight, config.mor_z_loss
        self.routers = nn.ModuleList(nn.Linear(config.hidden_size, 1) for _ in self.capacities)
        self.last: list[Routing] = []  # the last forward's routing per iteration (probe, tests)
        self.records: list[Tensor] = []  # training forwards' [bce, z] (summed over r), for the log

    def scores(self, r: int, h: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, gate alpha * sigmoid(logits)) [s, b] fp32 of iteration r's router."""
        logits = self.routers[r](h).squeeze(-1).float()
        return logits, self.alpha * torch.sigmoid(logits)

    def start(self, h_emb: Tensor, h_pre: Tensor) -> tuple[Tensor, MoRCarry]:
        self.last = []
        return h_pre, MoRCarry(None, None, [])

    def select(self, r: int, h: Tensor, rotary: Tensor, mask: Optional[Tensor], carry: MoRCarry):
        """What iteration r's core runs on: (tokens [k, b, h], their rotary rows, mask, carry)."""
        logits, gate = self.scores(r, h)
        active = carry.active if carry.active is not None else torch.ones_like(logits, dtype=torch.bool)
        index = top_tokens(gate.detach(), carry.active, keep_count(self.capacities[r], h.shape[0]))
        routing = Routing(index, gate.gather(0, index), logits, active)
        self.last.append(Routing(*(t.detach() for t in routing)))
        return (gather_tokens(h, index), gather_rotary(rotary, index), gather_mask(mask, index),
                carry._replace(routing=routing))

    def step(self, r: int, h: Tensor, y: Tensor, carry: MoRCarry) -> tuple[Tensor, MoRCarry]:
        """h + g * f(h) at the kept tokens (y = f(h) there, [k, b, h]); the rest unchanged."""
        routing = carry.routing
        index = routing.index[..., None].expand(-1, -1, h.shape[-1])
        h = h.scatter_add(0, index, routing.gate[..., None].to(y.dtype) * y)
        kept = torch.zeros_like(routing.active).scatter_(0, routing.index, True)
        aux = carry.aux + [torch.stack(aux_losses(routing))] if self.training else carry.aux
        carry = MoRCarry(kept, None, aux)
        if r == len(self.capacities) - 1 and aux:
            total = torch.stack(aux).sum(0)  # [bce, z] over the iterations
            self.records.append(total.detach())
            loss = self.aux_weight * total[0] + self.z_weight * total[1]
            if torch.is_grad_enabled() and loss.requires_grad:
                h = attach_aux_loss(h, loss.to(h.dtype))
        return h, carry


def mor_modules(model: nn.Module) -> list[nn.Module]:
    """The MoR state passings of `model`, either routing (model/mor_token.py: token choice)."""
    from mesh_megatron.model.mor_token import MoRTokenChoice

    return [m for m in model.modules() if isinstance(m, (MoRStatePassing, MoRTokenChoice))]


def pop_records(models) -> tuple[Tensor, int]:
    """The [bce, z] sum (float64, on the records' device: no host sync) and count of the training
    forwards since the last call (logging); token choice's records also carry what each recursion ran on."""
    total, count = None, 0
    for model in models:
        for m in mor_modules(model):
            for rec in m.records:
                total, count = (rec.double() if total is None else total + rec.double()), count + 1
            m.records = []
    return (torch.zeros(2, dtype=torch.float64) if total is None else total), count
