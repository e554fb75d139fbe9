"""Non-negative sparse coding over a fixed dictionary of unit-norm atoms: what ITDA encodes with.

Gradient pursuit (Blumensath & Davies 2008), non-negative, L0 = k, run for k iterations on every token
at once: inner products of the residual with all atoms -> add the best atom (largest inner product)
to the support -> step along the gradient restricted to the support with the exact line-search step
-> clamp at 0. Clamping after a full step can raise the error, so each iteration also computes the
feasible step (capped where a coefficient would cross 0; it never raises the error) and keeps, per
token, whichever of the two reconstructs better: the error never grows from one iteration to the next.

Matching pursuit (the original ITDA's encoder), restricted to positive inner products so codes stay
non-negative, is the other choice.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from fluxsae.dictionary import SparseCode
from fluxsae.kernels import block_rows

PURSUIT_CPU_BLOCK_BYTES = 1 << 24
"""Tokens go through the pursuit in blocks whose [rows, n_atoms] inner products take about this many
bytes on CPU: larger than the SAE's cache-sized blocks, since each block runs k rounds."""


def combine(indices: Tensor, weights: Tensor, atoms: Tensor) -> Tensor:
    """sum_s weights[:, s] * atoms[indices[:, s]]: [N, m], [N, m], [n, d] -> [N, d] (no [N, m, d] copy)."""
    return F.embedding_bag(indices, atoms, mode="sum", per_sample_weights=weights)


def _gradient_pursuit_block(x: Tensor, atoms: Tensor, k: int) -> tuple[Tensor, Tensor]:
    N, n = x.shape[0], atoms.shape[0]
    coef = x.new_zeros(N, k)
    idx = torch.zeros(N, k, dtype=torch.long, device=x.device)
    r = x.clone()
    for i in range(min(k, n)):
        ips = r @ atoms.T  # [N, n]: minus the gradient of ||r||^2 / 2 with respect to every coefficient
        support = idx[:, :i]
        g_old = ips.gather(1, support)
        ips.scatter_(1, support, float("-inf"))  # an atom enters the support once
        g_new, best = ips.max(1)
        idx[:, i] = best
        support = idx[:, : i + 1]
        g = torch.cat([g_old, g_new[:, None]], 1)
        a = coef[:, : i + 1]
        # the feasible direction: a coefficient at 0 cannot go down
        p = torch.where((a <= 0) & (g < 0), 0.0, g)
        c = combine(support, p, atoms)  # D_S^T p
        cc = (c * c).sum(1)
        pg = (p * g).sum(1)
        alpha = torch.where(cc > 0, pg / cc.clamp_min(torch.finfo(cc.dtype).tiny), 0.0)  # exact line search
        full = (a + alpha[:, None] * p).clamp_min(0)  # the reference's step: may raise the error
        cap = torch.where(p < 0, a / (-p).clamp_min(torch.finfo(p.dtype).tiny), math.inf).amin(1)
        capped = (a + torch.minimum(alpha, cap)[:, None] * p).clamp_min(0)  # never raises it
        r_full = x - combine(support, full, atoms)
        r_capped = x - combine(support, capped, atoms)
        use_full = (r_full * r_full).sum(1) <= (r_capped * r_capped).sum(1)
        coef[:, : i + 1] = torch.where(use_full[:, None], full, capped)
        r = torch.where(use_full[:, None], r_full, r_capped)
    return coef, idx


def _matching_pursuit_block(x: Tensor, atoms: Tensor, k: int) -> tuple[Tensor, Tensor]:
    N, n = x.shape[0], atoms.shape[0]
    coef = x.new_zeros(N, k)
    idx = torch.zeros(N, k, dtype=torch.long, device=x.device)
    r = x.clone()
    for i in range(min(k, n)):
        ips = r @ atoms.T
        ips.scatter_(1, idx[:, :i], float("-inf"))
        value, best = ips.max(1)
        value = value.clamp_min(0)  # non-negative codes: a negative best inner product adds nothing
        coef[:, i], idx[:, i] = value, best
        r = r - value[:, None] * atoms[best]
    return coef, idx


def pursuit(
    x: Tensor,
    atoms: Tensor,
    k: int,
    method: Literal["gradient_pursuit", "matching_pursuit"] = "gradient_pursuit",
) -> SparseCode:
    """Non-negative sparse codes of x [N, d] over unit-norm `atoms` [n, d]: coefficients, indices [N, k].

    At most min(k, n) atoms per token, each chosen once. Gradient pursuit: see the module docstring.
    Matching pursuit: the atom with the largest positive inner product with the residual gets that
    inner product as its coefficient and is subtracted. With n < k the last slots hold (0, index 0).
    """
    if x.ndim != 2 or atoms.ndim != 2 or x.shape[1] != atoms.shape[1]:
        raise ValueError(
            f"pursuit needs x [N, d] and atoms [n, d], got {tuple(x.shape)} and {tuple(atoms.shape)}"
        )
    block = {"gradient_pursuit": _gradient_pursuit_block, "matching_pursuit": _matching_pursuit_block}[method]
    x = x.to(atoms.dtype)
    if atoms.shape[0] == 0 or x.shape[0] == 0:
        return SparseCode(
            x.new_zeros(x.shape[0], k), torch.zeros(x.shape[0], k, dtype=torch.long, device=x.device)
        )
    rows = block_rows(atoms.shape[0], x, min_rows=16, cpu_bytes=PURSUIT_CPU_BLOCK_BYTES)
    parts = [block(x[s : s + rows], atoms, k) for s in range(0, x.shape[0], rows)]
    return SparseCode(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
