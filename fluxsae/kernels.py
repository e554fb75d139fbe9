"""Sparse kernels shared by the dictionaries: top-k encoding and sparse decoding without dense codes.

TopK encode never materialises all [tokens, n_features] pre-activations at once (rows go in blocks),
and its backward never forms the dense [tokens, n_features] gradient; decoding is an `embedding_bag`
over dictionary rows. `block_rows` is the one policy for how many token rows a block holds.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# Rows are processed in blocks. On CPU a [rows, n_features] block of pre-activations that stays in
# cache lets topk read it from cache, and reusing one block avoids the page faults of a fresh 30+ MB
# tensor every step (measured: the matmul alone runs ~1.5x faster into a reused buffer). On GPUs
# blocks are large (one big kernel is best) but bounded, so a 65k-wide dictionary never holds all
# [tokens, n_features] inner products at once.

CPU_BLOCK_BYTES = 1 << 21
"""Bytes of one block on CPU: about what stays in a core's cache."""
GPU_BLOCK_BYTES = 1 << 28
"""Bytes of one block on a GPU: large, but bounded."""


def block_rows(row_elems: int, like: Tensor, *, min_rows: int = 1, cpu_bytes: int = CPU_BLOCK_BYTES) -> int:
    """Token rows per block, so that a [rows, row_elems] block in `like`'s dtype and device fits the
    device's byte budget (`cpu_bytes` on CPU, GPU_BLOCK_BYTES elsewhere), with at least `min_rows`.

    Callers whose per-block work has a high fixed cost (ITDA's pursuit runs k rounds per block) pass a
    larger `cpu_bytes`."""
    row_bytes = max(1, row_elems * like.element_size())
    budget = cpu_bytes if like.device.type == "cpu" else GPU_BLOCK_BYTES
    return max(min_rows, budget // row_bytes)


def topk_rows(pre: Tensor, k: int, out: tuple[Tensor, Tensor]) -> None:
    """`torch.topk(pre, k, sorted=False, out=out)` for pre [rows, n], faster on CPU when n >> k.

    Columns are split into G strided groups ({c, c + n/G, c + 2n/G, ...}: their maxima are one
    elementwise max over G contiguous slices, which vectorises); the k groups with the largest maxima
    hold every top-k element (each of those k maxima is an element at least as large as the k-th
    largest group maximum, so no element below it is in the top k), and the top k of their k x G members
    are the answer. The same values as torch.topk; among tied values either may pick other indices.
    """
    rows, n = pre.shape
    G = 1 << max(2, min(4, round(math.log2(max(1.0, n / max(k, 1))) / 2)))  # ~ sqrt(n / k), 4-16
    if pre.device.type != "cpu" or n % G or n // G < 2 * k:
        torch.topk(pre, k, sorted=False, out=out)
        return
    m = n // G
    _, groups = pre.view(rows, G, m).amax(1).topk(k, sorted=False)  # [rows, k] of the m groups
    cols = (groups.unsqueeze(2) + torch.arange(0, n, m, device=pre.device)).view(rows, k * G)
    values, local = pre.gather(1, cols).topk(k, sorted=False)
    out[0].copy_(values)
    torch.gather(cols, 1, local, out=out[1])


def scatter_rows(indices: Tensor, weights: Tensor, table: Tensor, n: int) -> Tensor:
    """out[j] = sum over (t, s) with indices[t, s] == j of weights[t, s] * table[t].

    indices, weights: [N, m]; table: [N, D] -> [n, D]. This is the gradient of W_enc and W_dec.
    Done as an `embedding_bag` over tokens with the (token, slot) pairs grouped by feature: no
    [N * m, D] temporary (as `index_add_` needs) and no write conflicts, so it parallelises.
    """
    flat = indices.reshape(-1)
    order = torch.argsort(flat)
    rows = torch.div(order, indices.shape[1], rounding_mode="floor")
    counts = torch.bincount(flat, minlength=n)
    offsets = torch.zeros_like(counts)
    torch.cumsum(counts[:-1], 0, out=offsets[1:])
    return F.embedding_bag(
        rows, table, offsets, mode="sum", per_sample_weights=weights.reshape(-1)[order].to(table.dtype)
    )


def gather_dot(rows: Tensor, indices: Tensor, vectors: Tensor) -> Tensor:
    """out[t, s] = <rows[indices[t, s]], vectors[t]>; rows [n, D], indices [N, m], vectors [N, D]."""
    N, m = indices.shape
    out = vectors.new_empty(N, m)
    chunk = block_rows(m * rows.shape[1], vectors, min_rows=16)
    buf = rows.new_empty(min(chunk, N) * m, rows.shape[1])
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        block = torch.index_select(rows, 0, indices[s:e].reshape(-1), out=buf[: (e - s) * m])
        block = block.view(e - s, m, -1).mul_(vectors[s:e, None, :])
        torch.sum(block, -1, out=out[s:e])
    return out


class FusedEncoder(torch.autograd.Function):
    """(x [N, D], W [n, D], b [n]) -> top_acts, top_indices [N, k], aux_acts, aux_indices [N, k_aux].

    Forward: pre = x W^T + b, topk per token, ReLU on the selected values only. With `dead`
    (indices of dead features) it also takes the top `aux_k` pre-activations among them (AuxK).
    Backward: gradients of W and b gathered per selected feature (`scatter_rows`, `index_add_`) and
    of x as an `embedding_bag` over rows of W; the dense [N, n] gradient is never formed.
    """

    @staticmethod
    def forward(ctx, x: Tensor, W: Tensor, b: Tensor, k: int, aux_k: int, dead: Tensor | None):
        N, n = x.shape[0], W.shape[0]
        k_aux = min(aux_k, dead.numel()) if dead is not None else 0
        top_acts, aux_acts = x.new_empty(N, k), x.new_empty(N, k_aux)
        top_idx = torch.empty(N, k, dtype=torch.long, device=x.device)
        aux_idx = torch.empty(N, k_aux, dtype=torch.long, device=x.device)
        xc, Wc, bc = x, W, b
        if torch.is_autocast_enabled(x.device.type):
            # Under autocast the encoder matmul runs in the autocast dtype (as sparsify's F.linear does): an
            # `out=` matmul is not cast by autocast itself. Gradients stay in the parameters' dtype.
            dt = torch.get_autocast_dtype(x.device.type)
            xc, Wc, bc = x.to(dt), W.to(dt), b.to(dt)
        chunk = block_rows(n, xc, min_rows=256)
        buf = xc.new_empty(min(chunk, N), n)
        Wt = Wc.t()
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            pre = torch.addmm(bc, xc[s:e], Wt, out=buf[: e - s])
            if pre.dtype == x.dtype:
                topk_rows(pre, k, out=(top_acts[s:e], top_idx[s:e]))
            else:
                values, top_idx[s:e] = pre.topk(k, sorted=False)
                top_acts[s:e] = values
            if k_aux:
                acts, local = torch.index_select(pre, 1, dead).topk(k_aux, sorted=False)
                aux_acts[s:e], aux_idx[s:e] = acts, dead[local]
        top_acts.relu_()
        aux_acts.relu_()
        ctx.save_for_backward(x, W, top_acts, top_idx, aux_acts, aux_idx)
        ctx.mark_non_differentiable(top_idx, aux_idx)
        return top_acts, top_idx, aux_acts, aux_idx

    @staticmethod
    def backward(ctx, grad_top, _grad_idx, grad_aux, _grad_aux_idx):
        x, W, top_acts, top_idx, aux_acts, aux_idx = ctx.saved_tensors
        # The ReLU: a selected pre-activation <= 0 gives a zero code and no gradient.
        grad = torch.where(top_acts > 0, grad_top, 0)
        idx = top_idx
        if aux_idx.shape[1]:
            grad = torch.cat([grad, torch.where(aux_acts > 0, grad_aux, 0)], 1)
            idx = torch.cat([idx, aux_idx], 1)
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(idx, W, mode="sum", per_sample_weights=grad.to(W.dtype))
        if ctx.needs_input_grad[1]:
            grad_W = scatter_rows(idx, grad, x, W.shape[0]).to(W.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = W.new_zeros(W.shape[0]).index_add_(0, idx.reshape(-1), grad.reshape(-1).to(W.dtype))
        return grad_x, grad_W, grad_b, None, None, None


class SparseDecode(torch.autograd.Function):
    """(acts [N, m], indices [N, m], W [n, D]) -> [N, D] = sum_s acts[:, s] * W[indices[:, s]].

    Forward is `embedding_bag`; the backward is ours because torch's CPU `embedding_bag`
    backward for W is ~3x slower than `scatter_rows`.
    """

    @staticmethod
    def forward(ctx, acts: Tensor, indices: Tensor, W: Tensor):
        ctx.save_for_backward(acts, indices, W)
        return F.embedding_bag(indices, W, mode="sum", per_sample_weights=acts)

    @staticmethod
    def backward(ctx, grad_out):
        acts, indices, W = ctx.saved_tensors
        grad_acts = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_acts = gather_dot(W, indices, grad_out.contiguous())
        if ctx.needs_input_grad[2]:
            grad_W = scatter_rows(indices, acts, grad_out, W.shape[0])
        return grad_acts, None, grad_W
