"""Read and write the dictionary formats of other libraries (sparsify, SAELens), with identical encodings.

    d = import_dictionary(folder)              # any format below, detected from the folder's files
    export_sae(sae, folder, format="sparsify") # or "saelens"; those libraries load it with the same codes

Formats read (`detect_format` names them):

- "fluxsae": our own `cfg.json` + `sae.safetensors` / `itda.safetensors` (read by `load_folder`).
- "sparsify" (EleutherAI): `cfg.json` + `sae.safetensors` with encoder.weight [n, d], encoder.bias [n],
  W_dec [n, d], b_dec [d] (+ W_skip [d, d]); encode = TopK(ReLU(encoder(x - b_dec))), decode = acts @ W_dec
  + b_dec. A non-zero W_skip, transcoders and "groupmax" are refused: a TopK SAE has none of them.
- "saelens": `cfg.json` + `sae_weights.safetensors` with W_enc [d, n], b_enc [n], W_dec [n, d], b_dec [d].
  Architecture "topk" (incl. `rescale_acts_by_decoder_norm` and `apply_b_dec_to_input=False`, both folded
  into the weights exactly). JumpReLU is refused: its L0 varies per token, while every fluxsae dictionary
  has at most k active features per token (SparseCode [..., k]) that steering, heatmaps and autointerp
  rely on. Per-token normalisations ("layer_norm", "constant_norm_rescale") are refused too: they are not
  affine, so no weights reproduce them.
- "openai" (SDXL-unbox's OpenAI-style TopK) and "itda_reference" (the reference work's ITDA): research
  code, not libraries; read by `fluxsae.research_formats`.

An imported dictionary keeps the source's own config in `cfg.extra["imported"]`. A folder exported by
fluxsae carries the fluxsae config inside (sparsify: in the safetensors metadata; SAELens: in cfg.json's
`metadata`), so exporting and importing again gives back the same config.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from fluxsae.dictionary import CFG_FILE, DICTIONARY_FILES, Dictionary, DictionaryLoadError, load_folder
from fluxsae.fileio import atomic_path, load_tensors, save_tensors, write_json
from fluxsae.sae import SAEConfig, TopKSAE
from fluxsae.sites import parse_site

logger = logging.getLogger(__name__)

Format = Literal["fluxsae", "sparsify", "saelens", "openai", "itda_reference"]
FORMATS: tuple[str, ...] = ("fluxsae", "sparsify", "saelens", "openai", "itda_reference")
EXPORT_FORMATS: tuple[str, ...] = ("sparsify", "saelens")

SPARSIFY_WEIGHTS, SAELENS_WEIGHTS, OPENAI_WEIGHTS, OPENAI_CFG = (
    "sae.safetensors",
    "sae_weights.safetensors",
    "state_dict.pth",
    "config.json",
)
SAELENS_VERSION = "6.0.0"
"""The SAELens config layout `export_sae` writes (SAELens >= 6 reads it without its pre-6 fix-ups)."""


class FormatError(DictionaryLoadError):
    """A folder in another library's format that fluxsae cannot represent exactly; says why and what to do."""


# -- detection -------------------------------------------------------------------------------------


def _tensor_names(path: Path) -> set[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return set(f.keys())
    except Exception as err:  # safetensors raises its own types for torn files
        raise DictionaryLoadError(
            f"{path}: not a readable safetensors file ({err}); download it again"
        ) from err


def detect_format(folder: str | os.PathLike) -> Format:
    """Which format the dictionary in `folder` is in, from its file names and tensor names."""
    folder = Path(folder)
    if (folder / OPENAI_WEIGHTS).is_file():
        return "openai"
    if (folder / SAELENS_WEIGHTS).is_file():
        return "saelens"
    if (folder / "itda.safetensors").is_file():
        return "fluxsae"
    if (folder / SPARSIFY_WEIGHTS).is_file():
        names = _tensor_names(folder / SPARSIFY_WEIGHTS)
        if "encoder.weight" in names:
            return "sparsify"
        if "xs" in names:
            return "itda_reference"
        return "fluxsae"
    have = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else None
    raise DictionaryLoadError(
        f"{folder}: no dictionary weights found ("
        + (f"it holds {have}" if have is not None else "the folder does not exist")
        + "). fluxsae reads its own folders (cfg.json + sae.safetensors or itda.safetensors), sparsify "
        f"(sae.safetensors), SAELens ({SAELENS_WEIGHTS}) and SDXL-unbox/OpenAI ({OPENAI_WEIGHTS}); pass "
        "the folder of one hookpoint"
    )


def import_dictionary(
    folder: str | os.PathLike, *, site: str | None = None, base_model: str | None = None, device="cpu"
) -> Dictionary:
    """The dictionary in `folder`, whatever its format (`detect_format`), on `device`.

    `site` and `base_model` fill the provenance other formats do not record (fluxsae exports carry their
    own). Raises DictionaryLoadError (FormatError for dictionaries no fluxsae kind represents exactly).
    """
    fmt = detect_format(folder)
    if fmt == "fluxsae":
        return load_folder(folder, device=device)
    from fluxsae import research_formats

    reader = {
        "sparsify": _read_sparsify,
        "saelens": _read_saelens,
        "openai": research_formats.read_openai,
        "itda_reference": research_formats.read_itda_reference,
    }[fmt]
    return reader(Path(folder), site, base_model).to(device).eval()


# -- provenance --------------------------------------------------------------------------------------


def _site_of(folder: Path, site: str | None, *recorded) -> str:
    """The site to record: the caller's, else a recorded one, else the folder name, if it names a site."""
    for candidate in (site, *recorded, folder.name):
        if candidate:
            try:
                return str(parse_site(candidate))
            except (ValueError, TypeError):
                if candidate is site:
                    return str(site)  # the caller's word for a non-FLUX hookpoint, kept as given
    return ""


def _sae(weights: dict[str, Tensor], k: int, provenance: dict, own: dict | None, imported: dict) -> TopKSAE:
    """A TopKSAE of float64-computed `weights` (W_enc [n, d], b_enc [n], W_dec [n, d], b_dec [d])."""
    n, d = weights["W_enc"].shape
    cfg = None
    if own:  # a folder exported by fluxsae: its full config, if it describes these weights
        try:
            cfg = SAEConfig.from_dict(own)
        except (ValueError, TypeError) as err:
            logger.warning("ignoring the fluxsae config inside %s (%s)", imported.get("path"), err)
        if cfg is not None and (cfg.d_in, cfg.n_features, cfg.k) != (d, n, k):
            cfg = None
    if cfg is None:
        cfg = SAEConfig(
            d_in=d, n_features=n, k=k, normalization="none", **provenance, extra={"imported": imported}
        )
    weights = {name: t.to(torch.float32) for name, t in weights.items()}
    return TopKSAE._from_weights(cfg, weights, "cpu", torch.float32)


def _provenance(site: str, base_model: str | None, dtype: str = "float32") -> dict:
    return {"site": site, "base_model": base_model or "", "dtype": dtype}


def _read_json(path: Path) -> dict:
    from fluxsae.dictionary import read_json

    return read_json(path, "download the folder again")


def _weights(path: Path, required: set[str], optional: set[str] = frozenset(), meta: dict | None = None):
    """The float64 tensors of a safetensors file, exactly `required` (+ `optional`), finite; its metadata
    goes into `meta` when given."""
    try:
        tensors, file_meta = load_tensors(path)
    except Exception as err:
        raise DictionaryLoadError(
            f"{path}: not a readable safetensors file ({err}); download it again"
        ) from err
    missing, unexpected = sorted(required - set(tensors)), sorted(set(tensors) - required - optional)
    if missing or unexpected:
        raise DictionaryLoadError(
            f"{path}: missing tensors {missing}, unexpected tensors {unexpected}; expected "
            f"{sorted(required)} (optional {sorted(optional)})"
        )
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad and required & set(bad):
        raise DictionaryLoadError(f"{path}: tensors {bad} hold NaN/inf; the file is damaged")
    if meta is not None:
        meta.update(file_meta)
    return {name: t.to(torch.float64) for name, t in tensors.items()}


def _check_shapes(path: Path, tensors: dict[str, Tensor], shapes: dict[str, tuple[int, ...]], said: str):
    for name, want in shapes.items():
        if tuple(tensors[name].shape) != want:
            raise DictionaryLoadError(
                f"{path}: tensor {name} has shape {list(tensors[name].shape)}, but {said} implies "
                f"{list(want)}; the config and weights do not belong together"
            )


def _check_k(cfg_path: Path, k, n: int) -> None:
    """A TopK config's k must be an integer in 1..n (the dictionary's width)."""
    if not isinstance(k, int) or not 0 < k <= n:
        raise DictionaryLoadError(f"{cfg_path}: k must be an integer in 1..{n}, got {k!r}")


# -- EleutherAI sparsify -----------------------------------------------------------------------------


def _read_sparsify(folder: Path, site: str | None, base_model: str | None) -> TopKSAE:
    raw = _read_json(folder / CFG_FILE)
    path = folder / SPARSIFY_WEIGHTS
    if raw.get("transcode"):
        raise FormatError(
            f"{folder}: a sparsify transcoder (it predicts another module's output, without "
            "subtracting b_dec); fluxsae dictionaries reconstruct their own input"
        )
    if raw.get("activation", "topk") != "topk":
        raise FormatError(
            f"{folder}: sparsify activation {raw.get('activation')!r}; fluxsae reads 'topk' only"
        )
    file_meta: dict = {}
    t = _weights(path, {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}, {"W_skip"}, file_meta)
    n, d = t["encoder.weight"].shape
    if raw.get("d_in", d) != d:
        raise DictionaryLoadError(f"{folder / CFG_FILE}: d_in={raw['d_in']} but encoder.weight is [{n}, {d}]")
    _check_shapes(
        path, t, {"encoder.bias": (n,), "W_dec": (n, d), "b_dec": (d,)}, f"encoder.weight [{n}, {d}]"
    )
    if "W_skip" in t and t["W_skip"].any():
        raise FormatError(
            f"{path}: a non-zero W_skip (a skip connection x @ W_skip^T is added to every "
            "reconstruction); a TopK SAE has none, so it cannot be imported exactly"
        )
    k = raw.get("k")
    _check_k(folder / CFG_FILE, k, n)
    weights = {
        "W_enc": t["encoder.weight"],
        "b_enc": t["encoder.bias"],
        "W_dec": t["W_dec"],
        "b_dec": t["b_dec"],
    }
    own = file_meta.get("fluxsae")  # an export of fluxsae: its config rides in the safetensors metadata
    imported = {
        "format": "sparsify",
        "path": str(folder),
        "config": raw,
    }
    return _sae(weights, k, _provenance(_site_of(folder, site), base_model), own, imported)


# -- SAELens -----------------------------------------------------------------------------------------


def _saelens_architecture(raw: dict) -> tuple[str, int | None]:
    """(architecture, k) of a SAELens cfg.json, with the pre-6 spelling (activation_fn "topk") read too."""
    kind = raw.get("architecture") or "standard"
    k = raw.get("k")
    act = raw.get("activation_fn") or raw.get("activation_fn_str")
    kwargs = raw.get("activation_fn_kwargs") or {}
    if kind == "standard" and act == "topk" and kwargs.get("k") is not None:
        kind, k = "topk", kwargs["k"]
    return kind, k


def _read_saelens(folder: Path, site: str | None, base_model: str | None) -> TopKSAE:
    raw = _read_json(folder / CFG_FILE)
    path = folder / SAELENS_WEIGHTS
    kind, k = _saelens_architecture(raw)
    if kind in ("jumprelu", "batchtopk"):
        raise FormatError(
            f"{folder}: a SAELens {kind!r} SAE (JumpReLU thresholds at inference): its number of active "
            "features varies per token, and every fluxsae dictionary has at most k per token (the sparse "
            "codes, steering and heatmaps rely on it), so it cannot be imported exactly. Run it with "
            "SAELens (SAE.load_from_disk), or train a TopK SAE on the site"
        )
    if kind != "topk":
        raise FormatError(
            f"{folder}: SAELens architecture {kind!r} is not a TopK SAE; fluxsae imports 'topk'"
        )
    norm = raw.get("normalize_activations") or "none"
    if norm in ("layer_norm", "constant_norm_rescale"):
        raise FormatError(
            f"{folder}: normalize_activations={norm!r} rescales every token by its own norm, "
            "which no affine SAE reproduces; fluxsae cannot import it exactly"
        )
    t = _weights(path, {"W_enc", "b_enc", "W_dec", "b_dec"})
    d, n = t["W_enc"].shape
    if (raw.get("d_in", d), raw.get("d_sae", n)) != (d, n):
        raise DictionaryLoadError(
            f"{folder / CFG_FILE}: d_in={raw.get('d_in')}, d_sae={raw.get('d_sae')} but W_enc is [{d}, {n}]"
        )
    _check_shapes(path, t, {"b_enc": (n,), "W_dec": (n, d), "b_dec": (d,)}, f"W_enc [{d}, {n}]")
    _check_k(folder / CFG_FILE, k, n)
    W_enc, b_enc, W_dec, b_dec = t["W_enc"].T, t["b_enc"], t["W_dec"], t["b_dec"]
    if not raw.get("apply_b_dec_to_input", True):  # SAELens: pre = x W_enc + b_enc; ours subtracts b_dec
        b_enc = b_enc + W_enc @ b_dec
    if raw.get("rescale_acts_by_decoder_norm"):  # SAELens scales pre-acts by |W_dec_i|, divides on decode
        norms = W_dec.norm(dim=1)
        W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]
    meta = raw.get("metadata") or {}
    own = meta.get("fluxsae")
    recorded = meta.get("hook_name") or raw.get("hook_name")
    imported = {
        "format": "saelens",
        "path": str(folder),
        "config": {**raw, "metadata": {k_: v for k_, v in meta.items() if k_ != "fluxsae"}},
    }
    base = base_model or meta.get("model_name") or raw.get("model_name")
    weights = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    return _sae(weights, k, _provenance(_site_of(folder, site, recorded), base), own, imported)


# -- export ------------------------------------------------------------------------------------------


def export_sae(
    sae: TopKSAE, folder: str | os.PathLike, format: Literal["sparsify", "saelens"] = "sparsify"
) -> Path:
    """Write `sae` to `folder` (one hookpoint's folder) in another library's format; returns the folder.

    "sparsify": cfg.json + sae.safetensors, for `sparsify.SparseCoder.load_from_disk(folder)`;
    "saelens": cfg.json + sae_weights.safetensors (architecture "topk"), for `SAE.load_from_disk(folder)`.
    Weights are float32 in raw activation space (the normalisation folded in), so the library's own
    encode gives fluxsae's codes. The fluxsae config travels inside, so `import_dictionary` restores it.
    """
    if not isinstance(sae, TopKSAE):
        raise TypeError(f"export_sae writes TopK SAEs, got {type(sae).__name__}; ITDAs have no such format")
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {list(EXPORT_FORMATS)}, got {format!r}")
    if sae.cfg.batch_topk:
        raise ValueError(
            "This SAE is BatchTopK (cfg.batch_topk): it encodes by a threshold, which the exported "
            "per-token TopK formats cannot express. Share it in fluxsae's own folder format (sae.save)."
        )
    folder = Path(folder)
    folded = sae.fold_normalization() if sae._norm_kind != "identity" else sae
    w = {
        name: getattr(folded, name).detach().to("cpu", torch.float32)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec")
    }
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} is a file; export_sae writes a folder (one per hookpoint)")
    c = sae.cfg
    own = c.to_dict()
    # Both files go into a temporary folder that replaces `folder` in one step: a kill or a full disk
    # leaves the old export or the new one, never new weights beside an old cfg.json.
    with atomic_path(folder, is_dir=True, carry=lambda name: name not in DICTIONARY_FILES) as tmp:
        _export(format, tmp, w, c, own)
    return folder


def _export(format: str, folder: Path, w: dict[str, Tensor], c: SAEConfig, own: dict) -> None:
    if format == "sparsify":
        save_tensors(
            folder / SPARSIFY_WEIGHTS,
            {
                "encoder.weight": w["W_enc"],
                "encoder.bias": w["b_enc"],
                "W_dec": w["W_dec"],
                "b_dec": w["b_dec"],
            },
            metadata={"fluxsae": own},  # sparsify ignores file metadata (and logs unknown cfg.json keys)
        )
        cfg = {
            "activation": "topk",
            "expansion_factor": max(1, c.n_features // c.d_in),
            "normalize_decoder": False,
            "num_latents": c.n_features,
            "k": c.k,
            "multi_topk": False,
            "skip_connection": False,
            "transcode": False,
            "d_in": c.d_in,
        }
    else:
        save_tensors(
            folder / SAELENS_WEIGHTS,
            {
                "W_enc": w["W_enc"].T.contiguous(),
                "b_enc": w["b_enc"],
                "W_dec": w["W_dec"],
                "b_dec": w["b_dec"],
            },
        )
        cfg = {
            "architecture": "topk",
            "d_in": c.d_in,
            "d_sae": c.n_features,
            "k": c.k,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "rescale_acts_by_decoder_norm": False,
            "metadata": {
                "sae_lens_version": SAELENS_VERSION,
                "sae_lens_training_version": SAELENS_VERSION,
                "model_name": c.base_model,
                "hook_name": c.site,
                "fluxsae": own,
            },
        }
    write_json(folder / CFG_FILE, json.loads(json.dumps(cfg)))
