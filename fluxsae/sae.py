"""TopK sparse autoencoder (Gao et al. 2024) on one residual-stream site.

codes = TopK(ReLU(W_enc (normalise(x) - b_dec) + b_enc)),  x_hat = denormalise(W_dec^T codes + b_dec).

Training happens in a normalised space (the reference work whitens FLUX's residual stream: its
variance sits in a few dozen directions, and untreated > 99% of features die). `save` folds the
normalisation into the weights, so a saved SAE works on raw activations and its files hold the
four weight tensors only. The training step is in `fluxsae.sae_training`, the kernels (a fused
top-k encoder whose backward never forms a dense [tokens, n_features] gradient, and an
`embedding_bag` decoder) in `fluxsae.kernels`.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from fluxsae.dictionary import (
    CFG_FILE,
    Dictionary,
    DictionaryConfig,
    ForwardOutput,
    SparseCode,
    check_positive_ints,
    read_config,
    read_tensors,
    register,
)
from fluxsae.fileio import save_tensors, write_json
from fluxsae.kernels import FusedEncoder, SparseDecode

WEIGHTS_FILE = "sae.safetensors"

WEIGHT_SHAPES = {
    "W_enc": ("n_features", "d_in"),
    "b_enc": ("n_features",),
    "W_dec": ("n_features", "d_in"),
    "b_dec": ("d_in",),
}
"""The tensors of sae.safetensors and their shapes, as names of SAEConfig fields."""

Normalization = Literal["none", "standardize", "pca", "whiten"]

WHITEN_POWER = 0.35
"""Default power of the "whiten" normalisation (SAEConfig.whiten_power)."""


@dataclass(frozen=True)
class SAEConfig(DictionaryConfig):
    """Everything needed to rebuild a TopK SAE and to know what it was trained on (cfg.json).
    The provenance fields (site, base model, steps, ...) are those of `DictionaryConfig`."""

    ARCHITECTURE: ClassVar[str] = "topk"
    FORMAT_VERSION: ClassVar[int] = 4
    """2 added `matryoshka` (version 1 files are plain TopK SAEs); 3 added `batch_topk` and
    `threshold` (version 2 files are per-token TopK); 4 added `whiten_power` (the "whiten"
    normalisation)."""
    LABEL: ClassVar[str] = "SAE"

    d_in: int
    """Width of the site's residual stream (3072 for FLUX.1, 128 for the Shapes model)."""

    n_features: int
    """Number of dictionary features (latents)."""

    k: int
    """Active features per token."""

    normalization: Normalization = "standardize"
    """How inputs were normalised during training. Saved weights always work on raw activations:
    the normalisation is folded into them."""

    whiten_power: float = WHITEN_POWER
    """For normalization "whiten": standardised inputs are multiplied by C^-whiten_power, C their
    correlation matrix (eigenvalues floored at 1e-4 of the largest): 0 is plain standardisation, 0.5
    full (ZCA) whitening; in between, partial whitening. Unused by the other normalisations."""

    aux_k: int = 0
    """AuxK: dead features per token used in the auxiliary loss; 0 turns it off (Gao et al.: 512)."""

    aux_coef: float = 1 / 32
    """Weight of the AuxK loss in the training loss."""

    dead_after_tokens: int = 1_000_000
    """A feature is dead when it has not fired in this many training tokens."""

    matryoshka: tuple[int, ...] = ()
    """Matryoshka prefixes (Bussmann et al. 2025; Nabeshima 2024): increasing widths m < n_features whose
    first m features must reconstruct alone, from the same TopK code; the training loss is the mean FVU
    over the prefixes and the whole dictionary. Empty: a plain TopK SAE. Only training changes: encode
    and decode are the same, and the first features are the most general."""

    batch_topk: bool = False
    """BatchTopK (Bussmann et al. 2024): training keeps the N x k largest activations of a batch of N
    tokens, so a token may use more or fewer than k features; encoding then keeps the activations
    above `threshold`, at most BATCH_TOPK_SLOTS x k per token. False: exactly k per token."""

    threshold: float = 0.0
    """BatchTopK's encoding threshold on the pre-activations: the running mean of the smallest kept
    activation of the training batches (set when the SAE is saved)."""

    architecture: Literal["topk"] = "topk"
    """Dictionary type stored in this folder (the Hub layout names it in cfg.json)."""

    def __post_init__(self):
        super().__post_init__()
        check_positive_ints(self, ("d_in", "n_features", "k", "dead_after_tokens"))
        if self.k > self.n_features:
            raise ValueError(f"SAEConfig.k={self.k} exceeds n_features={self.n_features}")
        if not 0 <= self.aux_k <= self.n_features:
            raise ValueError(f"SAEConfig.aux_k must be in [0, n_features], got {self.aux_k}")
        if self.normalization not in ("none", "standardize", "pca", "whiten"):
            raise ValueError(
                "SAEConfig.normalization must be 'none', 'standardize', 'pca' or 'whiten', "
                f"got {self.normalization!r}"
            )
        if not (isinstance(self.whiten_power, (int, float)) and 0 <= self.whiten_power <= 0.5):
            raise ValueError(
                f"SAEConfig.whiten_power must be a number in [0, 0.5], got {self.whiten_power!r}"
            )
        object.__setattr__(self, "matryoshka", tuple(self.matryoshka))
        bounds = (0, *self.matryoshka, self.n_features)
        if any(not isinstance(m, int) or isinstance(m, bool) for m in self.matryoshka) or any(
            not a < b for a, b in itertools.pairwise(bounds)
        ):
            raise ValueError(
                "SAEConfig.matryoshka must be increasing whole widths between 0 and "
                f"n_features={self.n_features} (e.g. (16, 128, 512)), got {self.matryoshka!r}"
            )
        if not isinstance(self.batch_topk, bool):
            raise ValueError(f"SAEConfig.batch_topk must be True or False, got {self.batch_topk!r}")
        if not (isinstance(self.threshold, (int, float)) and 0 <= self.threshold < float("inf")):
            raise ValueError(f"SAEConfig.threshold must be a finite number >= 0, got {self.threshold!r}")
        if self.architecture != "topk":
            raise ValueError(f"SAEConfig.architecture must be 'topk', got {self.architecture!r}")

    @classmethod
    def upgrade(cls, d: dict, version: int) -> dict:
        if version < 2 and "matryoshka" not in d:
            d = {**d, "matryoshka": []}  # version 1 SAEs were plain TopK
        if version < 3:
            d = {"batch_topk": False, "threshold": 0.0, **d}  # version 2 SAEs were per-token TopK
        if version < 4:
            d = {"whiten_power": WHITEN_POWER, **d}  # no version 3 SAE used "whiten"
        return d

    @property
    def slots(self) -> int:
        """Code slots per token: k, or for BatchTopK the most features one token may use."""
        return min(self.n_features, BATCH_TOPK_SLOTS * self.k) if self.batch_topk else self.k


BATCH_TOPK_SLOTS = 4
"""A BatchTopK token may use up to this many times k features (the rest of the batch then uses fewer)."""
THRESHOLD_MOMENTUM = 0.99
"""BatchTopK: the running threshold moves this slowly towards each batch's smallest kept activation."""


_ENCODER_INIT_NORM = 0.7
"""Norm of the encoder rows at init: shorter than the decoder's unit rows reconstructs better than
W_enc = W_dec, and this one still keeps data-parallel training close to one process (figures in
benchmarks/README.md, "Design choices")."""


@register
class TopKSAE(Dictionary):
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
        # BatchTopK's running threshold (0 until the first training batch); saved into cfg.threshold.
        self.register_buffer("threshold", torch.full((), float(cfg.threshold), **kw))
        self._norm_kind = "identity"
        self.register_load_state_dict_post_hook(_after_load_state_dict)
        self._register_load_state_dict_pre_hook(_threshold_if_missing, with_module=True)

    CONFIG = SAEConfig
    WEIGHTS_FILE = WEIGHTS_FILE
    MAIN_TENSOR = "W_enc"

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
        "whiten": standardise, then shrink the correlation matrix's spectrum by the power
        `cfg.whiten_power` (partial whitening: low-variance directions gain weight in the loss).
        Variances below eps x the largest are raised to it, so flat directions are not blown up.
        Records the method in `cfg.normalization`.
        """
        method = method or self.cfg.normalization
        d = self.cfg.d_in
        x = x_sample.detach().reshape(-1, d)
        if method == "none":
            mean, T, T_inv = torch.zeros(d), torch.eye(d), torch.eye(d)
        else:
            if x.shape[0] < 2:
                raise ValueError(f"fit_normalization needs at least 2 tokens, got {x.shape[0]}")
            if method not in ("standardize", "pca", "whiten"):
                raise ValueError(
                    f"unknown normalization {method!r}; use 'none', 'standardize', 'pca' or 'whiten'"
                )
            # Sums in float64 over row blocks: a FLUX-sized sample (65k x 3072) would take 1.5 GB per
            # float64 copy of it.
            rows = _stat_rows(d)
            mean = sum(_f64(x[i : i + rows]).sum(0) for i in range(0, len(x), rows)) / len(x)
            if method in ("standardize", "whiten"):
                var = sum((_f64(x[i : i + rows]) - mean).pow(2).sum(0) for i in range(0, len(x), rows))
                var, basis = var / len(x), torch.eye(d, dtype=torch.float64)
            else:
                cov = torch.zeros(d, d, dtype=torch.float64)
                for i in range(0, len(x), rows):
                    xc = _f64(x[i : i + rows]) - mean
                    cov.addmm_(xc.T, xc)
                var, basis = torch.linalg.eigh(cov / len(x))
            if var.max() <= 0:
                raise ValueError("fit_normalization: the sample has zero variance in every dimension")
            std = var.clamp_min(eps * var.max()).sqrt()
            if method == "whiten":
                T, T_inv = _partial_whitening(x, mean, std, self.cfg.whiten_power)
            else:
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
        if method not in ("mean", "geometric_median"):
            raise ValueError(f"unknown method {method!r}; use 'mean' or 'geometric_median'")
        x = x_sample.detach().reshape(-1, self.cfg.d_in)
        if method == "mean":  # the normalisation is affine: the mean of z is z of the mean
            rows = _stat_rows(self.cfg.d_in)
            mean = sum(_f64(x[i : i + rows]).sum(0) for i in range(0, len(x), rows)) / len(x)
            m, T = (b.detach().to("cpu", torch.float64) for b in (self.norm_mean, self.norm_transform))
            self.b_dec.copy_((mean - m) @ T)
            return self
        z = self.normalize(x).to(torch.float64)
        center = z.mean(0)
        for _ in range(100):  # Weiszfeld iterations from the mean
            w = 1 / (z - center).norm(dim=1).clamp_min(1e-8)
            new = (w[:, None] * z).sum(0) / w.sum()
            done = (new - center).norm() <= 1e-6 * center.norm().clamp_min(1e-12)
            center = new
            if done:
                break
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
        folded.threshold.copy_(self.threshold)
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
            sae.threshold.fill_(float(cfg.threshold))
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
        return FusedEncoder.apply(z - self.b_dec, self.W_enc, self.b_enc, self.cfg.slots, aux_k, dead)

    def encode_sparse(self, x: Tensor) -> SparseCode:
        """Raw activations [..., d_in] -> SparseCode(values, indices) [..., k] ([..., cfg.slots] for
        BatchTopK, whose values below `cfg.threshold` are 0)."""
        lead = x.shape[:-1]
        top_acts, top_idx, _, _ = self._encode_flat(self.normalize(x).reshape(-1, self.cfg.d_in))
        if self.cfg.batch_topk:
            top_acts = top_acts * (top_acts > self.threshold)
        return SparseCode(top_acts.view(*lead, -1), top_idx.view(*lead, -1))

    def _batch_topk(self, top_acts: Tensor) -> Tensor:
        """Training: keep the N x k largest of a batch's [N, slots] activations (0 elsewhere) and move
        the running threshold towards the smallest one kept."""
        keep = min(top_acts.numel(), top_acts.shape[0] * self.cfg.k)
        smallest = top_acts.detach().flatten().topk(keep, sorted=False).values.min()
        kept = top_acts * (top_acts >= smallest)
        with torch.no_grad():
            if self.threshold == 0:
                self.threshold.copy_(smallest)
            else:
                self.threshold.lerp_(smallest.to(self.threshold.dtype), 1 - THRESHOLD_MOMENTUM)
        return kept

    def decode_sparse(self, values: Tensor, indices: Tensor) -> Tensor:
        """values, indices [..., k] -> x_hat [..., d_in] in raw space; no dense codes built."""
        lead, m = values.shape[:-1], values.shape[-1]
        acts = values.to(self.dtype).reshape(-1, m)
        z_hat = SparseDecode.apply(acts, indices.reshape(-1, m), self.W_dec) + self.b_dec
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
        if self.cfg.batch_topk:
            top_acts = self._batch_topk(top_acts) if self.training else top_acts * (top_acts > self.threshold)
        z_hat = SparseDecode.apply(top_acts, top_idx, self.W_dec) + self.b_dec
        # mse_loss(reduction="sum") is sum((a - b)^2) in one fused pass, and its backward too.
        total_variance = _total_variance(z)
        fvu = F.mse_loss(z_hat, z, reduction="sum") / total_variance
        loss = prefix_fvus = None
        if self.cfg.matryoshka:
            prefix_fvus = []
            for width in self.cfg.matryoshka:
                z_m = SparseDecode.apply(top_acts * (top_idx < width), top_idx, self.W_dec) + self.b_dec
                prefix_fvus.append(F.mse_loss(z_m, z, reduction="sum") / total_variance)
            prefix_fvus = torch.stack(prefix_fvus)
            loss = torch.cat([fvu[None], prefix_fvus]).mean()
        if aux_idx.shape[1]:
            e = (z - z_hat).detach()
            e_hat = SparseDecode.apply(aux_acts, aux_idx, self.W_dec)
            aux_loss = F.mse_loss(e_hat, e, reduction="sum") / _total_variance(e)
        else:
            aux_loss = fvu.new_zeros(())
        if self.training:
            self._record_firing(top_acts, top_idx)
        x_hat = self.denormalize(z_hat).view(x.shape)
        return ForwardOutput(x_hat, top_acts, top_idx, fvu, aux_loss, loss, prefix_fvus)

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
        g, W = self.W_dec.grad, self.W_dec.detach()
        if g is None:
            return
        # g -= <g, w> w per row: a batched dot and one addcmul_, with no [n, d] temporary (two of those,
        # page-faulted in afresh each step, made this 6x slower at FLUX.1's 16k x 3072).
        g.addcmul_(torch.bmm(g.unsqueeze(1), W.unsqueeze(2)).view(-1, 1), W, value=-1)

    # -- files ---------------------------------------------------------------------------------

    def save(self, folder: str | os.PathLike) -> None:
        """Write folder/sae.safetensors (weights with the normalisation folded in) and folder/cfg.json.

        The folder is replaced as a whole, in one step (`Dictionary._save_folder`): a kill or a full disk
        leaves the old SAE or the new one. Other files in it (feature statistics) are kept.
        """
        folded = self.fold_normalization() if self._norm_kind != "identity" else self
        tensors = {name: getattr(folded, name) for name in WEIGHT_SHAPES}
        if not all(torch.isfinite(t).all() for t in tensors.values()):
            raise ValueError(
                f"This SAE's weights hold NaN/inf (training diverged), so it would not load; not saved to "
                f"{folder}. Train again with a lower learning rate"
            )
        meta = {"format_version": SAEConfig.FORMAT_VERSION}
        cfg = self.cfg
        if cfg.batch_topk:
            cfg = dataclasses.replace(cfg, threshold=float(self.threshold))

        def write(tmp: Path) -> None:
            save_tensors(tmp / WEIGHTS_FILE, tensors, metadata=meta)
            write_json(tmp / CFG_FILE, cfg.to_dict())

        self._save_folder(folder, write)
        self.cfg = cfg

    @classmethod
    def load(
        cls, folder: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
        *, site: str | None = None,
    ) -> TopKSAE:  # fmt: skip
        """Read a folder written by `save`; returns the SAE in eval mode. Raises DictionaryLoadError,
        also when `site` is given and the folder holds another site's SAE."""
        folder = Path(folder)
        cfg = read_config(folder / CFG_FILE, SAEConfig, _REDO, site)
        shapes = {name: tuple(getattr(cfg, dim) for dim in dims) for name, dims in WEIGHT_SHAPES.items()}
        said = {
            name: f"{CFG_FILE} says " + " x ".join(f"{dim}={getattr(cfg, dim)}" for dim in dims)
            for name, dims in WEIGHT_SHAPES.items()
        }
        tensors, _ = read_tensors(
            folder / WEIGHTS_FILE, shapes, newest=SAEConfig.FORMAT_VERSION, redo=_REDO, said=said
        )
        return cls._from_weights(cfg, tensors, device, dtype or tensors["W_enc"].dtype).eval()


def _stat_rows(d: int) -> int:
    """Rows per block for float64 statistics of a sample: about 16 MB at a time."""
    return max(1, (1 << 21) // d)


def _f64(block: Tensor) -> Tensor:
    """A block of a normalisation sample in float64 on the CPU, refusing NaN/inf."""
    block = block.to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(block).all():
        raise ValueError("fit_normalization: the sample contains NaN or inf")
    return block


WHITEN_EIGEN_FLOOR = 1e-4
""""whiten": eigenvalues of the correlation matrix below this share of the largest are raised to it."""


def _partial_whitening(x: Tensor, mean: Tensor, std: Tensor, power: float) -> tuple[Tensor, Tensor]:
    """The "whiten" transform of a sample x [N, d] (float64 mean and std per dimension): T = S^-1 C^-p,
    with S = diag(std), C the correlation matrix and p = power, and its inverse C^p S, so that
    z = (x - mean) @ T. C^-p is symmetric (ZCA-like): the axes stay those of the standardised input."""
    d, rows = x.shape[1], _stat_rows(x.shape[1])
    corr = torch.zeros(d, d, dtype=torch.float64)
    for i in range(0, len(x), rows):
        zc = (_f64(x[i : i + rows]) - mean) / std
        corr.addmm_(zc.T, zc)
    eigval, eigvec = torch.linalg.eigh(corr / len(x))
    eigval = eigval.clamp_min(WHITEN_EIGEN_FLOOR * eigval.max())
    shrink = eigvec @ torch.diag(eigval.pow(-power)) @ eigvec.T
    grow = eigvec @ torch.diag(eigval.pow(power)) @ eigvec.T
    return shrink / std[:, None], grow * std[None, :]


def _total_variance(x: Tensor) -> Tensor:
    """sum((x - mean_over_batch(x))^2) for x [N, d], kept away from 0."""
    total = F.mse_loss(x, x.mean(0).expand_as(x), reduction="sum")
    return total.clamp_min(torch.finfo(x.dtype).tiny)


def _threshold_if_missing(module: TopKSAE, state_dict, prefix, *_args) -> None:
    """State dicts saved before BatchTopK (e.g. a checkpoint of a run being resumed) lack `threshold`."""
    state_dict.setdefault(prefix + "threshold", module.threshold.detach().clone())


def _after_load_state_dict(module: TopKSAE, _incompatible_keys) -> None:
    module._refresh_norm_kind()  # the normalisation buffers may have changed


_REDO = "re-save it with TopKSAE.save or download it again"
