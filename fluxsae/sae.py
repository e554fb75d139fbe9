"""TopK sparse autoencoder (Gao et al. 2024) on one residual-stream site.

codes = TopK(ReLU(W_enc (normalise(x) - b_dec) + b_enc)),  x_hat = denormalise(W_dec^T codes + b_dec).

Training happens in a normalised space (the reference work whitens FLUX's residual stream: its
variance sits in a few dozen directions, and untreated > 99% of features die). `save` folds the
normalisation into the weights, so a saved SAE works on raw activations and its files hold the
four weight tensors only.

Speed: the encoder is a custom autograd function (forward = matmul + topk; backward never forms
a dense [tokens, n_features] gradient) and decoding is an `embedding_bag` over decoder rows.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fluxsae.fileio import load_tensors, save_tensors, write_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""The newest cfg.json / sae.safetensors layout this code reads and the one it writes."""

WEIGHT_SHAPES = {
    "W_enc": ("n_features", "d_in"),
    "b_enc": ("n_features",),
    "W_dec": ("n_features", "d_in"),
    "b_dec": ("d_in",),
}
"""The tensors of sae.safetensors and their shapes, as names of SAEConfig fields."""

Normalization = Literal["none", "standardize", "pca"]


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fluxsae")
    except PackageNotFoundError:
        return "0.1.0"


@dataclass(frozen=True)
class SAEConfig:
    """Everything needed to rebuild a TopK SAE and to know what it was trained on (cfg.json)."""

    d_in: int
    """Width of the site's residual stream (3072 for FLUX.1, 128 for the Shapes model)."""

    n_features: int
    """Number of dictionary features (latents)."""

    k: int
    """Active features per token."""

    site: str = ""
    """The site the SAE reads, e.g. "transformer_blocks.3.image"."""

    base_model: str = ""
    """The diffusion model the activations came from: "shapes" or a Hub id."""

    base_revision: str | None = None
    """Hub revision (commit) of `base_model`, if known."""

    normalization: Normalization = "standardize"
    """How inputs were normalised during training. Saved weights always work on raw activations:
    the normalisation is folded into them."""

    aux_k: int = 0
    """AuxK: dead features per token used in the auxiliary loss; 0 turns it off (Gao et al.: 512)."""

    aux_coef: float = 1 / 32
    """Weight of the AuxK loss in the training loss."""

    dead_after_tokens: int = 1_000_000
    """A feature is dead when it has not fired in this many training tokens."""

    mean_token_norm: float = 0.0
    """Mean L2 norm of the site's raw tokens; steering strengths are in these units."""

    steps: tuple[int, ...] | None = None
    """Denoising steps the training activations came from (None: not recorded)."""

    resolution: tuple[int, int] | None = None
    """(height, width) in pixels of the generations the activations came from."""

    dtype: str = "float32"
    """Activation dtype at harvest."""

    quantization: str | None = None
    """Quantisation of the base model at harvest (e.g. "nf4"), None for none."""

    architecture: Literal["topk"] = "topk"
    """Dictionary type stored in this folder (the Hub layout names it in cfg.json)."""

    format_version: int = FORMAT_VERSION
    """Layout version of cfg.json and sae.safetensors."""

    fluxsae_version: str = field(default_factory=_package_version)
    """fluxsae version that wrote the SAE."""

    extra: dict = field(default_factory=dict)
    """Free-form JSON-serialisable details, e.g. training metrics."""

    def __post_init__(self):
        for name in ("d_in", "n_features", "k", "dead_after_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SAEConfig.{name} must be a positive integer, got {value!r}")
        if self.k > self.n_features:
            raise ValueError(f"SAEConfig.k={self.k} exceeds n_features={self.n_features}")
        if not 0 <= self.aux_k <= self.n_features:
            raise ValueError(f"SAEConfig.aux_k must be in [0, n_features], got {self.aux_k}")
        if self.normalization not in ("none", "standardize", "pca"):
            raise ValueError(
                f"SAEConfig.normalization must be 'none', 'standardize' or 'pca', got {self.normalization!r}"
            )
        if self.architecture != "topk":
            raise ValueError(f"SAEConfig.architecture must be 'topk', got {self.architecture!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists; `from_dict` turns them back)."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        """Inverse of `to_dict`; raises ValueError naming unknown or missing keys and too-new formats."""
        if not isinstance(d, dict):
            raise ValueError(f"an SAE config must be a JSON object, got {type(d).__name__}")
        version = d.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"format_version must be a positive integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise ValueError(
                f"format_version {version} is newer than this fluxsae ({_package_version()}) reads "
                f"(up to {FORMAT_VERSION}); upgrade fluxsae"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown SAE config keys {unknown}; known keys: {sorted(names)}")
        missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in d and _required(f))
        if missing:
            raise ValueError(f"SAE config lacks required keys {missing}")
        d = dict(d)
        for key in ("steps", "resolution"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


class EncoderOutput(NamedTuple):
    """The sparse codes of a batch of tokens."""

    top_acts: Tensor
    """[..., k] activations of the selected features (>= 0; ReLU of the pre-activations)."""

    top_indices: Tensor
    """[..., k] int64 indices of the selected features (unordered)."""


class ForwardOutput(NamedTuple):
    """What the training forward pass returns."""

    x_hat: Tensor
    """[..., d_in] reconstruction in raw activation space."""

    top_acts: Tensor
    """[N, k] activations of the selected features, N = tokens in the batch."""

    top_indices: Tensor
    """[N, k] int64 indices of the selected features."""

    fvu: Tensor
    """Scalar fraction of variance unexplained of this batch, in the normalised space z:
    sum((z - z_hat)^2) / sum((z - mean_over_batch(z))^2)."""

    aux_loss: Tensor
    """Scalar AuxK loss: ||e - e_hat||^2 / ||e - mean_over_batch(e)||^2, e = z - z_hat (detached)
    and e_hat its reconstruction by the top `aux_k` dead features; 0 when off or none is dead."""


class SAELoadError(ValueError):
    """A saved SAE folder could not be read; the message names the file and what to do."""


# ---------------------------------------------------------------------------------------------
# Sparse kernels. Rows are processed in blocks. On CPU a [rows, n_features] block of
# pre-activations that stays in cache lets topk read it from cache, and reusing one block avoids
# the page faults of a fresh 30+ MB tensor every step (measured: the matmul alone runs ~1.5x
# faster into a reused buffer). On GPUs blocks are large (one big kernel is best) but bounded, so
# a 65k-wide SAE never holds all [tokens, n_features] pre-activations at once.

_CPU_BLOCK_BYTES = 1 << 21
_GPU_BLOCK_BYTES = 1 << 28


def _chunk_rows(x: Tensor, row_elems: int, min_rows: int = 256) -> int:
    row_bytes = max(1, row_elems * x.element_size())
    if x.device.type == "cpu":
        return max(min_rows, _CPU_BLOCK_BYTES // row_bytes)
    return max(1, _GPU_BLOCK_BYTES // row_bytes)


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
    chunk = _chunk_rows(vectors, m * rows.shape[1], min_rows=16)
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
        chunk = _chunk_rows(x, n)
        buf = x.new_empty(min(chunk, N), n)
        Wt = W.t()
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            pre = torch.addmm(b, x[s:e], Wt, out=buf[: e - s])
            torch.topk(pre, k, sorted=False, out=(top_acts[s:e], top_idx[s:e]))
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


# ---------------------------------------------------------------------------------------------


_ENCODER_INIT_NORM = 0.7
"""Norm of the encoder rows at init. On the Shapes activations (2048 features, k 16, 300 steps of
4096 tokens, 3 seeds) held-out FVU was 0.0949-0.0960 at norm 1 (W_enc = W_dec), 0.0922-0.0936 at
0.7 and 0.0919-0.0926 at 1/sqrt(3) (sparsify's nn.Linear init). 0.7 keeps nearly all of the gain
while leaving training less chaotic: two DDP processes and one process with the same global batch
end with decoders at mean cosine 0.985 (0.978 at 1/sqrt(3))."""


class TopKSAE(torch.nn.Module):
    """TopK sparse autoencoder with an input normalisation and dead-feature tracking.

    Parameters: W_enc [n_features, d_in], b_enc [n_features], W_dec [n_features, d_in],
    b_dec [d_in], all in the normalised space z = (x - norm_mean) @ norm_transform.
    """

    def __init__(
        self,
        cfg: SAEConfig,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.cfg = cfg
        n, d = cfg.n_features, cfg.d_in
        # Gao et al. / sparsify: random unit-norm decoder rows, encoder rows parallel to them, zero
        # biases. Encoder rows have norm _ENCODER_INIT_NORM (see there).
        kw = {"device": device, "dtype": dtype}
        rng_device = generator.device if generator is not None else device
        W_dec = torch.randn(n, d, generator=generator, device=rng_device, dtype=dtype).to(device)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_enc = torch.nn.Parameter(W_dec * _ENCODER_INIT_NORM)
        self.b_enc = torch.nn.Parameter(torch.zeros(n, **kw))
        self.W_dec = torch.nn.Parameter(W_dec)
        self.b_dec = torch.nn.Parameter(torch.zeros(d, **kw))
        self.register_buffer("norm_mean", torch.zeros(d, **kw))
        self.register_buffer("norm_transform", torch.eye(d, **kw))
        self.register_buffer("norm_inverse", torch.eye(d, **kw))
        self.register_buffer("tokens_since_fired", torch.zeros(n, dtype=torch.long, device=device))
        self._norm_kind = "identity"
        self.register_load_state_dict_post_hook(_after_load_state_dict)

    @property
    def site(self) -> str:
        return self.cfg.site

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    def extra_repr(self) -> str:
        c = self.cfg
        return f"site={c.site!r}, d_in={c.d_in}, n_features={c.n_features}, k={c.k}, norm={self._norm_kind}"

    # -- normalisation -------------------------------------------------------------------------

    def _refresh_norm_kind(self) -> None:
        T, eye = self.norm_transform, torch.eye(self.cfg.d_in, device=self.device, dtype=self.dtype)
        if torch.equal(T, eye) and not self.norm_mean.any():
            self._norm_kind = "identity"
        elif torch.equal(T, torch.diag(T.diagonal())):
            self._norm_kind = "diagonal"
        else:
            self._norm_kind = "full"

    def normalize(self, x: Tensor) -> Tensor:
        """Raw activations [..., d_in] -> the normalised space the weights live in."""
        x = x.to(self.dtype)
        if self._norm_kind == "identity":
            return x
        if self._norm_kind == "diagonal":
            return (x - self.norm_mean) * self.norm_transform.diagonal()
        return (x - self.norm_mean) @ self.norm_transform

    def denormalize(self, z: Tensor) -> Tensor:
        """Inverse of `normalize`."""
        if self._norm_kind == "identity":
            return z
        if self._norm_kind == "diagonal":
            return torch.addcmul(self.norm_mean, z, self.norm_inverse.diagonal())
        return torch.addmm(self.norm_mean, z.reshape(-1, z.shape[-1]), self.norm_inverse).view(z.shape)

    @torch.no_grad()
    def fit_normalization(self, x_sample: Tensor, method: Normalization | None = None, eps: float = 1e-6):
        """Learn the input normalisation from raw activations x_sample [N, d_in]; call before training.

        "standardize": subtract the mean, divide each dimension by its std. "pca" (the reference
        work's choice): rotate onto the principal axes and standardise each axis (PCA whitening).
        Variances below eps x the largest are raised to it, so flat directions are not blown up.
        Records the method in `cfg.normalization`.
        """
        method = method or self.cfg.normalization
        d = self.cfg.d_in
        x = x_sample.detach().reshape(-1, d).to(device="cpu", dtype=torch.float64)
        if method == "none":
            mean, T, T_inv = torch.zeros(d), torch.eye(d), torch.eye(d)
        else:
            if x.shape[0] < 2:
                raise ValueError(f"fit_normalization needs at least 2 tokens, got {x.shape[0]}")
            if not torch.isfinite(x).all():
                raise ValueError("fit_normalization: the sample contains NaN or inf")
            mean = x.mean(0)
            xc = x - mean
            if method == "standardize":
                var = xc.pow(2).mean(0)
                basis = torch.eye(d, dtype=torch.float64)
            elif method == "pca":
                var, basis = torch.linalg.eigh(xc.T @ xc / x.shape[0])
            else:
                raise ValueError(f"unknown normalization {method!r}; use 'none', 'standardize' or 'pca'")
            if var.max() <= 0:
                raise ValueError("fit_normalization: the sample has zero variance in every dimension")
            std = var.clamp_min(eps * var.max()).sqrt()
            T, T_inv = basis / std, std[:, None] * basis.T
        for buf, value in ((self.norm_mean, mean), (self.norm_transform, T), (self.norm_inverse, T_inv)):
            buf.copy_(value)
        self.cfg = dataclasses.replace(self.cfg, normalization=method)
        self._refresh_norm_kind()
        return self

    @torch.no_grad()
    def init_b_dec_from_data(self, x_sample: Tensor, method: Literal["mean", "geometric_median"] = "mean"):
        """Set b_dec to the mean (as sparsify does) or geometric median of x_sample [N, d_in], in
        the normalised space, so pre-activations start centred."""
        z = self.normalize(x_sample.detach().reshape(-1, self.cfg.d_in)).to(torch.float64)
        center = z.mean(0)
        if method == "geometric_median":  # Weiszfeld iterations from the mean
            for _ in range(100):
                w = 1 / (z - center).norm(dim=1).clamp_min(1e-8)
                new = (w[:, None] * z).sum(0) / w.sum()
                done = (new - center).norm() <= 1e-6 * center.norm().clamp_min(1e-12)
                center = new
                if done:
                    break
        elif method != "mean":
            raise ValueError(f"unknown method {method!r}; use 'mean' or 'geometric_median'")
        self.b_dec.copy_(center)
        return self

    @torch.no_grad()
    def fold_normalization(self) -> TopKSAE:
        """An equivalent SAE whose normalisation is the identity: its weights work on raw activations.

        With z = (x - m) T: W_enc' = W_enc T^T, b_dec' = m + b_dec T^-1, W_dec' = W_dec T^-1,
        b_enc' = b_enc. Pre-activations are unchanged (not rescaled), so the same features are
        selected; decoder rows are no longer unit norm (`directions` normalises them).
        """
        f64 = {name: p.detach().to(torch.float64) for name, p in self.named_parameters()}
        m, T, T_inv = (b.to(torch.float64) for b in (self.norm_mean, self.norm_transform, self.norm_inverse))
        if self._norm_kind == "full":
            into, out_of = (lambda W: W @ T.T), (lambda W: W @ T_inv)
        else:  # diagonal (or identity): per-dimension scales, no d_in x d_in matmul
            into, out_of = (lambda W: W * T.diagonal()), (lambda W: W * T_inv.diagonal())
        weights = {
            "W_enc": into(f64["W_enc"]),
            "b_enc": f64["b_enc"],
            "W_dec": out_of(f64["W_dec"]),
            "b_dec": m + out_of(f64["b_dec"]),
        }
        folded = TopKSAE._from_weights(self.cfg, weights, self.device, self.dtype)
        folded.tokens_since_fired.copy_(self.tokens_since_fired)
        return folded.train(self.training)

    @classmethod
    def _from_weights(cls, cfg: SAEConfig, weights: dict[str, Tensor], device, dtype) -> TopKSAE:
        """An SAE with the given weights and identity normalisation, without a random init."""
        sae = cls(cfg, device="meta", dtype=dtype)
        sae.to_empty(device=device)
        with torch.no_grad():
            for name in WEIGHT_SHAPES:
                getattr(sae, name).copy_(weights[name])
            sae.norm_mean.zero_()
            sae.norm_transform.copy_(torch.eye(cfg.d_in))
            sae.norm_inverse.copy_(torch.eye(cfg.d_in))
            sae.tokens_since_fired.zero_()
        sae._norm_kind = "identity"
        return sae

    @property
    def directions(self) -> Tensor:
        """[n_features, d_in] unit-norm feature directions in raw activation space (detached)."""
        W = self.W_dec.detach()
        if self._norm_kind != "identity":
            W = W @ self.norm_inverse
        return W / W.norm(dim=1, keepdim=True).clamp_min(torch.finfo(W.dtype).tiny)

    # -- encode / decode -----------------------------------------------------------------------

    def _encode_flat(self, z: Tensor, aux_k: int = 0, dead: Tensor | None = None):
        return FusedEncoder.apply(z - self.b_dec, self.W_enc, self.b_enc, self.cfg.k, aux_k, dead)

    def encode_sparse(self, x: Tensor) -> EncoderOutput:
        """Raw activations [..., d_in] -> top_acts, top_indices [..., k]."""
        lead = x.shape[:-1]
        top_acts, top_idx, _, _ = self._encode_flat(self.normalize(x).reshape(-1, self.cfg.d_in))
        return EncoderOutput(top_acts.view(*lead, -1), top_idx.view(*lead, -1))

    def encode(self, x: Tensor) -> Tensor:
        """Raw activations [..., d_in] -> dense codes [..., n_features] (k non-zeros per token at most)."""
        top_acts, top_idx = self.encode_sparse(x)
        zeros = top_acts.new_zeros(*top_acts.shape[:-1], self.cfg.n_features)
        return zeros.scatter(-1, top_idx, top_acts)

    def decode_sparse(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """top_acts, top_indices [..., k] -> x_hat [..., d_in] in raw space; no dense codes built."""
        lead, m = top_acts.shape[:-1], top_acts.shape[-1]
        acts = top_acts.to(self.dtype).reshape(-1, m)
        z_hat = SparseDecode.apply(acts, top_indices.reshape(-1, m), self.W_dec) + self.b_dec
        return self.denormalize(z_hat).view(*lead, self.cfg.d_in)

    def decode(self, codes: Tensor) -> Tensor:
        """Dense codes [..., n_features] -> x_hat [..., d_in] in raw space."""
        return self.denormalize(codes.to(self.dtype) @ self.W_dec + self.b_dec)

    def forward(self, x: Tensor) -> ForwardOutput:
        """The training pass on raw activations x [..., d_in]; FVU and AuxK in the normalised space.

        In training mode it updates `tokens_since_fired` from this process's tokens only: no
        collective runs inside forward (data-parallel training syncs the counters after the step,
        as training/train_sae.py does).
        """
        d = self.cfg.d_in
        z = self.normalize(x).reshape(-1, d)
        dead = None
        if self.cfg.aux_k > 0:
            dead = self.dead_mask().nonzero().squeeze(1)
            dead = dead if dead.numel() else None
        top_acts, top_idx, aux_acts, aux_idx = self._encode_flat(z, self.cfg.aux_k, dead)
        z_hat = SparseDecode.apply(top_acts, top_idx, self.W_dec) + self.b_dec
        # mse_loss(reduction="sum") is sum((a - b)^2) in one fused pass, and its backward too.
        fvu = F.mse_loss(z_hat, z, reduction="sum") / _total_variance(z)
        if aux_idx.shape[1]:
            e = (z - z_hat).detach()
            e_hat = SparseDecode.apply(aux_acts, aux_idx, self.W_dec)
            aux_loss = F.mse_loss(e_hat, e, reduction="sum") / _total_variance(e)
        else:
            aux_loss = fvu.new_zeros(())
        if self.training:
            self._record_firing(top_acts, top_idx)
        return ForwardOutput(self.denormalize(z_hat).view(x.shape), top_acts, top_idx, fvu, aux_loss)

    # -- dead features -------------------------------------------------------------------------

    @torch.no_grad()
    def _record_firing(self, top_acts: Tensor, top_idx: Tensor) -> None:
        fired = torch.zeros(self.cfg.n_features, dtype=torch.int32, device=top_idx.device)
        fired.index_add_(0, top_idx.reshape(-1), (top_acts > 0).reshape(-1).to(torch.int32))
        self.tokens_since_fired.add_(top_idx.shape[0]).masked_fill_(fired > 0, 0)

    def dead_mask(self) -> Tensor:
        """[n_features] bool: features that have not fired in `cfg.dead_after_tokens` training tokens."""
        return self.tokens_since_fired >= self.cfg.dead_after_tokens

    def dead_fraction(self) -> float:
        return self.dead_mask().float().mean().item()

    # -- decoder constraints (the reference work keeps decoder rows unit norm) ------------------

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        norm = self.W_dec.norm(dim=1, keepdim=True)
        self.W_dec.div_(norm.clamp_min(torch.finfo(norm.dtype).eps))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Drop the part of W_dec's gradient that would only change row norms (rows are unit norm)."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(1, keepdim=True)
        self.W_dec.grad.sub_(parallel * self.W_dec)

    # -- files ---------------------------------------------------------------------------------

    def save(self, folder: str | os.PathLike) -> None:
        """Write folder/sae.safetensors (weights with the normalisation folded in) and folder/cfg.json.

        Each file is replaced atomically; other files in the folder (e.g. an ITDA) are left alone.
        """
        folder = Path(folder)
        folded = self.fold_normalization() if self._norm_kind != "identity" else self
        tensors = {name: getattr(folded, name) for name in WEIGHT_SHAPES}
        save_tensors(folder / "sae.safetensors", tensors, metadata={"format_version": FORMAT_VERSION})
        write_json(folder / "cfg.json", self.cfg.to_dict())

    @classmethod
    def load(
        cls, folder: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> TopKSAE:
        """Read a folder written by `save`; returns the SAE in eval mode. Raises SAELoadError."""
        folder = Path(folder)
        cfg = _read_cfg(folder / "cfg.json")
        tensors = _read_weights(folder / "sae.safetensors", cfg)
        return cls._from_weights(cfg, tensors, device, dtype or tensors["W_enc"].dtype).eval()


def _total_variance(x: Tensor) -> Tensor:
    """sum((x - mean_over_batch(x))^2) for x [N, d], kept away from 0."""
    total = F.mse_loss(x, x.mean(0).expand_as(x), reduction="sum")
    return total.clamp_min(torch.finfo(x.dtype).tiny)


def _after_load_state_dict(module: TopKSAE, _incompatible_keys) -> None:
    module._refresh_norm_kind()  # the normalisation buffers may have changed


_REDO = "re-save it with TopKSAE.save or download it again"


def _read_cfg(path: Path) -> SAEConfig:
    if not path.is_file():
        where = "the folder does not exist" if not path.parent.is_dir() else "the file is missing"
        raise SAELoadError(
            f"{path}: {where}. An SAE folder holds cfg.json and sae.safetensors (TopKSAE.save writes "
            "both); check the path and the site name"
        )
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SAELoadError(f"{path}: not valid JSON ({err}); {_REDO}") from err
    try:
        return SAEConfig.from_dict(raw)
    except (ValueError, TypeError) as err:
        raise SAELoadError(f"{path}: {err}") from err


def _read_weights(path: Path, cfg: SAEConfig) -> dict[str, Tensor]:
    if not path.is_file():
        raise SAELoadError(f"{path}: the file is missing (its cfg.json is there); {_REDO}")
    try:
        tensors, meta = load_tensors(path)
    except Exception as err:  # safetensors raises its own error types for torn files
        raise SAELoadError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {err}; {_REDO}"
        ) from err
    version = meta.get("format_version", FORMAT_VERSION)
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise SAELoadError(f"{path}: format_version {version} is newer than this fluxsae reads; upgrade it")
    missing, unexpected = sorted(set(WEIGHT_SHAPES) - set(tensors)), sorted(set(tensors) - set(WEIGHT_SHAPES))
    if missing or unexpected:
        raise SAELoadError(f"{path}: missing tensors {missing}, unexpected tensors {unexpected}; {_REDO}")
    for name, dims in WEIGHT_SHAPES.items():
        want = tuple(getattr(cfg, dim) for dim in dims)
        got = tuple(tensors[name].shape)
        if got != want:
            named = " x ".join(f"{dim}={getattr(cfg, dim)}" for dim in dims)
            raise SAELoadError(
                f"{path}: tensor {name} has shape {list(got)} but cfg.json says {named}; the two files "
                f"do not belong together; {_REDO}"
            )
        if not tensors[name].is_floating_point():
            raise SAELoadError(f"{path}: tensor {name} has dtype {tensors[name].dtype}, expected a float")
        bad = (~torch.isfinite(tensors[name])).sum().item()
        if bad:
            raise SAELoadError(
                f"{path}: tensor {name} has {bad} NaN/inf values; the training run diverged or the file is "
                f"damaged; retrain or {_REDO}"
            )
    return tensors


# ---------------------------------------------------------------------------------------------
# Training step, shared by training/ and benchmarks/.


def make_optimizer(sae: TopKSAE, lr: float = 2e-4) -> torch.optim.Adam:
    """Adam with the reference work's settings: beta1 = 0, beta2 = 0.99, eps = 1e-10.

    beta1 = 0 (no momentum) suits TopK: a feature's gradient is zero on the steps it is not
    selected, and momentum would keep moving it anyway. On the test suite's sparse data (500 steps,
    lr 5e-3, 3 init seeds) it reached held-out FVU 0.086-0.090 against 0.093-0.099 for default
    Adam (0.9, 0.999). `fused=True` runs the update as one kernel over all parameters (CPU and CUDA).
    """
    return torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.0, 0.99), eps=1e-10, fused=True)


def train_step(model, optimizer: torch.optim.Optimizer, x: Tensor, *, clip_grad: float | None = None):
    """One optimisation step on raw activations x [N, d_in]; loss = fvu + aux_coef * aux_loss.

    `model` is a TopKSAE or a DistributedDataParallel wrapping one. Returns floats
    {"fvu", "aux_loss", "l0" (mean non-zeros per token), "dead_fraction"}.
    """
    sae: TopKSAE = getattr(model, "module", model)
    out = model(x)
    loss = out.fvu + sae.cfg.aux_coef * out.aux_loss if sae.cfg.aux_k else out.fvu
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    if clip_grad is not None:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), clip_grad)
    optimizer.step()
    sae.set_decoder_norm_to_unit_norm()
    with torch.no_grad():
        l0 = (out.top_acts > 0).sum(-1).to(out.fvu.dtype).mean()
        dead = sae.dead_mask().to(out.fvu.dtype).mean()
        fvu, aux, l0, dead = torch.stack([out.fvu, out.aux_loss, l0, dead]).tolist()
    if not math.isfinite(fvu):
        log.warning("train_step: FVU is %s", fvu)
    return {"fvu": fvu, "aux_loss": aux, "l0": l0, "dead_fraction": dead}
