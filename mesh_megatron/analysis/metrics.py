"""The diagnostics of docs/MESH_METHOD.md section 6, on the states of one sequence.

Every function takes states as `[s, h]` (one sequence's tokens x hidden) or a batch of them
`[b, s, h]`, and returns one number per sequence; the probe averages over sequences. The
math runs in float64 whatever the input dtype: the probe's model runs in fp32, and CKA of
near-identical states needs the extra digits in the centred kernel sums.

RBF CKA (Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited"):
    K_ij = exp(-|x_i - x_j|^2 / (2 sigma^2)) over the s tokens of the sequence,
    sigma^2 = scale^2 * median_{i<j} |x_i - x_j|^2                  (the bandwidth rule)
    CKA(X, Y) = <HKH, HLH>_F / (|HKH|_F |HLH|_F),   H = I - 11^T / s
sigma is the median pairwise token distance of that state in that sequence (scale 1.0, the
default of the paper's reference code, which takes sigma as a fraction of the median
distance). Being relative to the state's own distances, it makes CKA invariant to rotations
and to isotropic scaling of each state, which the loop states of different variants need:
their norms differ by orders of magnitude.
"""

from __future__ import annotations

import torch
from torch import Tensor

BANDWIDTH_RULE = ("RBF kernel per sequence over its tokens; sigma^2 = scale^2 x median of the "
                  "squared pairwise token distances (i < j) of that state in that sequence")


def _batched(x: Tensor) -> Tensor:
    """[s, h] or [b, s, h] -> float64 [b, s, h]."""
    if x.ndim == 2:
        x = x.unsqueeze(0)
    if x.ndim != 3:
        raise ValueError(f"states must be [s, h] or [b, s, h], got shape {tuple(x.shape)}")
    return x.double()


def relative_update(h: Tensor, f_h: Tensor) -> Tensor:
    """2 |f(h) - h|_F / (|f(h)|_F + |h|_F) per sequence: [b]. 0 for the identity, 2 when
    f(h) = -h; the Frobenius norm runs over the sequence's [s, h] matrix."""
    h, f_h = _batched(h), _batched(f_h)
    diff = torch.linalg.matrix_norm(f_h - h)
    total = torch.linalg.matrix_norm(f_h) + torch.linalg.matrix_norm(h)
    return 2.0 * diff / total.clamp_min(torch.finfo(torch.float64).tiny)


def rbf_gram(x: Tensor, scale: float = 1.0) -> Tensor:
    """The RBF kernel between the tokens of each sequence, bandwidth by the median rule
    (module docstring): [b, s, s]."""
    x = _batched(x)
    s = x.shape[1]
    if s < 2:
        raise ValueError("the RBF bandwidth needs at least 2 tokens per sequence")
    sq_norm = (x * x).sum(-1)  # [b, s]
    sq_dist = (sq_norm[:, :, None] + sq_norm[:, None, :] - 2.0 * x @ x.transpose(1, 2)).clamp_min(0.0)
    i, j = torch.triu_indices(s, s, offset=1, device=x.device)
    median = sq_dist[:, i, j].median(dim=-1).values  # [b]
    sigma_sq = (scale**2 * median).clamp_min(torch.finfo(torch.float64).tiny)
    return torch.exp(-sq_dist / (2.0 * sigma_sq[:, None, None]))


def center_gram(k: Tensor) -> Tensor:
    """H K H for a batch of symmetric kernels [b, s, s]."""
    return (k - k.mean(dim=-1, keepdim=True) - k.mean(dim=-2, keepdim=True)
            + k.mean(dim=(-2, -1), keepdim=True))


def cka_from_centered(kc: Tensor, lc: Tensor) -> Tensor:
    """CKA of two centred kernels [b, s, s] -> [b]."""
    hsic = (kc * lc).sum(dim=(-2, -1))
    norms = torch.linalg.matrix_norm(kc) * torch.linalg.matrix_norm(lc)
    return hsic / norms.clamp_min(torch.finfo(torch.float64).tiny)


def cka(x: Tensor, y: Tensor, scale: float = 1.0) -> Tensor:
    """RBF CKA between two states of the same sequences: [b]."""
    return cka_from_centered(center_gram(rbf_gram(x, scale)), center_gram(rbf_gram(y, scale)))


def cka_matrix(states: list[Tensor], scale: float = 1.0) -> Tensor:
    """CKA between every pair of states: [b, n, n] for n states of shape [b, s, h]. Each
    kernel is built and centred once."""
    centered = [center_gram(rbf_gram(x, scale)) for x in states]
    n = len(centered)
    out = torch.empty(centered[0].shape[0], n, n, dtype=torch.float64, device=centered[0].device)
    for a in range(n):
        for b in range(a, n):
            out[:, a, b] = out[:, b, a] = cka_from_centered(centered[a], centered[b])
    return out


def normalized_spectrum(x: Tensor, top: int = 50) -> Tensor:
    """The `top` largest singular values of each sequence's [s, h] state divided by the
    largest: [b, min(top, s, h)], descending, the first entry 1. No centring: a state that
    collapses onto a few directions shows it as a fast drop."""
    sv = torch.linalg.svdvals(_batched(x))[:, :top]  # descending
    return sv / sv[:, :1].clamp_min(torch.finfo(torch.float64).tiny)
