"""Mixture-of-Recursions, token choice (arXiv 2507.10524 section 2.2.1; docs/MESH_METHOD.md section 9).

One router Linear(h -> K) reads the state entering the loop, h_0 (the paper's H^1), once, and
gives every token its depth:

    p = softmax(w h_0 + b)            [s, b, K] fp32
    d = argmax_j p_j                  (top-1; ties: the shallower depth, argmax's first maximum,
                                       the same on every tensor-parallel rank, which holds the same h_0)
    g = alpha * p_d                   (the chosen depth's probability: the gate)

Token i goes through recursions 0..d(i). At recursion r the core runs on the tokens with d >= r,
gathered in causal order per sequence with their own rotary rows; sequences of the batch have
different counts, so each is padded at its end to the batch's longest with tokens already done
(causal attention keeps padding out of every real token's view; padding outputs are dropped).
The update (the paper's token-choice equation, as the reference implements it):

    h_{r+1} = f(h_r)               where d > r      (still going: the core's output, ungated)
    h_{r+1} = h_0 + g * f(h_r)     where d == r     (its last recursion)
    h_{r+1} = h_r                  where d < r      (done)

with f the whole core (its layers carry their own residual). The router learns through g and
through the Switch balancing loss over the depths (weight mor_balance_weight),

    L_bal = K * sum_j frac_j * P_j,    frac_j = share of tokens with d = j,  P_j = mean_i p_j(i),

plus optionally the z-loss mean_i logsumexp(logits(i))^2 (mor_z_loss). Loss-free balancing
(mor_bias_rate u, off by default): d = argmax_j (p_j + b_j) with a bias b per depth that is not
trained (the gate stays alpha * p_d), moved after every training forward by
b_j += u * sign(mean share - share_j), the shares over the forward's tokens of all DP ranks. Both enter backward through
MoEAuxLossAutoScaler on the loop's output, as expert choice's (model/mor.py), so pipeline
parallelism needs nothing else; they are recorded as [balance, z] (expert choice: [bce, z]).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from mesh_megatron.config import ModelConfig
from mesh_megatron.model.mor import attach_aux_loss, gather_mask, gather_rotary, gather_tokens


class DepthRouting(NamedTuple):
    """The forward's depths: d [s, b] (long, 0-based: the last recursion a token runs), its gate
    [s, b] fp32, the router logits [s, b, K] fp32 and softmax probabilities, h_0 (the update's base)."""

    depth: Tensor
    gate: Tensor
    logits: Tensor
    probs: Tensor
    first: Tensor


class Recursion(NamedTuple):
    """What recursion r ran on: positions [k, b] (those with d >= r first, in causal order, then
    padding) and which of them are real [k, b]."""

    index: Tensor
    valid: Tensor


class TokenChoiceCarry(NamedTuple):
    routing: Optional[DepthRouting]
    recursion: Optional[Recursion]


def balance_loss(routing: DepthRouting) -> Tensor:
    """Switch's K * sum_j frac_j * P_j over all tokens (1 when balanced or uniform)."""
    K = routing.probs.shape[-1]
    frac = torch.bincount(routing.depth.flatten(), minlength=K).to(routing.probs.dtype) / routing.depth.numel()
    return K * (frac * routing.probs.flatten(0, 1).mean(0)).sum()


def z_loss(routing: DepthRouting) -> Tensor:
    return (torch.logsumexp(routing.logits, dim=-1) ** 2).mean()


def recursion_tokens(depth: Tensor, r: int) -> Recursion:
    """Positions recursion r runs on: per sequence the tokens with d >= r in causal order, padded
    at the end with the others to the batch's largest count (at least one token)."""
    active = depth >= r
    k = max(1, int(active.sum(0).max()))
    index = torch.sort((~active).to(torch.uint8), dim=0, stable=True).indices[:k]  # active first, each in order
    return Recursion(index, active.gather(0, index))


class MoRTokenChoice(nn.Module):
    """Token-choice MoR: `router` Linear(h -> K), a depth per token from h_0."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.loops = config.parsed_layout.loops
        self.alpha = config.gate_alpha
        self.balance_weight, self.z_weight = config.balance_weight, config.mor_z_loss
        self.router = nn.Linear(config.hidden_size, self.loops)
        # loss-free balancing (mor_bias_rate): a bias per depth for the top-1 only, not trained
        self.bias_rate = config.mor_bias_rate
        if self.bias_rate is not None:
            self.register_buffer("depth_bias", torch.zeros(self.loops))
        self.routing: Optional[DepthRouting] = None  # the last forward's, detached (tests)
        self.last: list[Recursion] = []  # per recursion, the positions it ran on
        self.records: list[Tensor] = []  # training forwards' [balance, z, k_0 / s, .., k_{K-1} / s], for the log

    def route(self, h0: Tensor) -> DepthRouting:
        logits = self.router(h0).float()
        probs = torch.softmax(logits, dim=-1)
        scores = probs.detach() if self.bias_rate is None else probs.detach() + self.depth_bias
        depth = scores.argmax(dim=-1)
        gate = self.alpha * probs.gather(-1, depth[..., None]).squeeze(-1)
        return DepthRouting(depth, gate, logits, probs, h0)

    @torch.no_grad()
    def update_bias(self, depth: Tensor) -> None:
        """Loss-free balancing: b_j += rate * sign(mean share - share_j), the shares counted over this
        forward's tokens on every data-parallel rank (one all-reduce of K counts), so every replica,
        and every TP rank (the same tokens), moves its bias alike."""
        counts = torch.bincount(depth.flatten(), minlength=self.loops).to(self.depth_bias.dtype)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            from megatron.core import parallel_state

            if parallel_state.get_data_parallel_world_size() > 1:
                torch.distributed.all_reduce(counts, group=parallel_state.get_data_parallel_group())
        share = counts / counts.sum()
        self.depth_bias.add_(self.bias_rate * torch.sign(share.mean() - share))

    def start(self, h_emb: Tensor, h_pre: Tensor) -> tuple[Tensor, TokenChoiceCarry]:
        self.last = []
        return h_pre, TokenChoiceCarry(None, None)

    def select(self, r: int, h: Tensor, rotary: Tensor, mask: Optional[Tensor], carry: TokenChoiceCarry):
        """What recursion r's core runs on: (tokens [k, b, h], their rotary rows, mask, carry)."""
        routing = carry.routing if carry.routing is not None else self.route(h)
        if r == 0:
            self.routing = DepthRouting(*(t.detach() for t in routing))
        rec = recursion_tokens(routing.depth, r)
        self.last.append(rec)
        sub = gather_mask(mask, rec.index)
        if sub is not None:  # a real token never sees padding (megatron's mask: True = forbidden)
            valid = rec.valid.t()
            sub = sub | (valid[:, None, :, None] & ~valid[:, None, None, :])
        return (gather_tokens(h, rec.index), gather_rotary(rotary, rec.index), sub,
                TokenChoiceCarry(routing, rec))

    def step(self, r: int, h: Tensor, y: Tensor, carry: TokenChoiceCarry) -> tuple[Tensor, TokenChoiceCarry]:
        routing, rec = carry.routing, carry.recursion
        f = h.scatter(0, rec.index[..., None].expand(-1, -1, h.shape[-1]), y)  # f(h_r) at every d >= r
        depth = routing.depth[..., None]
        done = routing.first + routing.gate[..., None].to(y.dtype) * f
        h = torch.where(depth > r, f, torch.where(depth == r, done, h))
        if r == self.loops - 1 and self.training:
            if self.bias_rate is not None:
                self.update_bias(routing.depth)
            losses = torch.stack([balance_loss(routing), z_loss(routing)])
            # and what the core ran on: per recursion the gathered length k_r (padding included:
            # it is computed) over s, for the log's FLOPs (model/accounting.py processed_fractions)
            seq = routing.depth.shape[0]
            ran = torch.tensor([rec.index.shape[0] / seq for rec in self.last], device=losses.device)
            self.records.append(torch.cat([losses.detach(), ran.to(losses.dtype)]))
            loss = self.balance_weight * losses[0] + self.z_weight * losses[1]
            if torch.is_grad_enabled() and loss.requires_grad:
                h = attach_aux_loss(h, loss.to(h.dtype))
        return h, TokenChoiceCarry(routing, None)
