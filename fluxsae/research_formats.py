"""Formats of research code that is not an installable library, read with identical decodes.

- "openai": the OpenAI-style TopK format of SDXL-unbox (`config.json` + `state_dict.pth`: encoder.weight
  [n, d], decoder.weight [d, n], pre_bias [d], latent_bias [n]); read with torch.load(weights_only=True)
  only, so no pickled code ever runs. OpenAI's own GPT-2 files (which layer-normalise every token) are
  refused: no affine SAE reproduces that.
- "itda_reference": the reference work's ITDA (`cfg.json` + `sae.safetensors` with xs, ys [2^m, d] padded
  to a power of two, mean_x, mean_y [d], skip `weight` [d, d]); the first `dictionary_size` rows are the
  atoms. Codes then come from fluxsae's gradient pursuit: the reference's step, except where clamping it at
  0 would raise the error (there fluxsae takes the capped step). Decode is identical; on 10k random
  activations the codes agree to 1e-7, and where they differ fluxsae's reconstruct better.

`fluxsae.formats.import_dictionary` detects these folders and calls the readers here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fluxsae.dictionary import CFG_FILE, DictionaryLoadError
from fluxsae.fileio import load_tensors
from fluxsae.formats import (
    OPENAI_CFG,
    OPENAI_WEIGHTS,
    SPARSIFY_WEIGHTS,
    FormatError,
    _check_k,
    _check_shapes,
    _provenance,
    _read_json,
    _sae,
    _site_of,
)
from fluxsae.itda import ITDA, ITDAConfig
from fluxsae.sae import TopKSAE

# -- OpenAI-style TopK (SDXL-unbox) -----------------------------------------------------------------


def read_openai(folder: Path, site: str | None, base_model: str | None) -> TopKSAE:
    raw = _read_json(folder / OPENAI_CFG)
    path = folder / OPENAI_WEIGHTS
    try:  # weights_only: tensors, dicts and strings only; a pickle that names code is refused, not run
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DictionaryLoadError(
            f"{path}: not a plain tensor checkpoint ({type(err).__name__}: {err}); fluxsae reads .pth files "
            "with torch.load(weights_only=True) only and never runs pickled code"
        ) from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # SDXL-unbox saves {"state_dict": ...}
    if not isinstance(state, dict):
        raise DictionaryLoadError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    if "activation" in state or state.get("normalize"):
        raise FormatError(
            f"{path}: an OpenAI autoencoder that layer-normalises every token before encoding; "
            "no affine TopK SAE reproduces that, so fluxsae cannot import it exactly"
        )
    required, optional = (
        {"encoder.weight", "decoder.weight", "pre_bias", "latent_bias"},
        {"stats_last_nonzero"},
    )
    missing, unexpected = sorted(required - set(state)), sorted(set(state) - required - optional)
    if missing or unexpected:
        raise DictionaryLoadError(
            f"{path}: missing tensors {missing}, unexpected entries {unexpected}; expected {sorted(required)}"
        )
    t = {name: state[name].to(torch.float64) for name in required}
    n, d = t["encoder.weight"].shape
    _check_shapes(
        path,
        t,
        {"decoder.weight": (d, n), "pre_bias": (d,), "latent_bias": (n,)},
        f"encoder.weight [{n}, {d}]",
    )
    if not all(torch.isfinite(x).all() for x in t.values()):
        raise DictionaryLoadError(f"{path}: NaN/inf weights; the file is damaged")
    dims = (raw.get("d_model", d), raw.get("n_dirs_local", raw.get("n_dirs", n)))
    if dims != (d, n):
        raise DictionaryLoadError(
            f"{folder / OPENAI_CFG}: d_model, n_dirs_local = {dims} but encoder.weight is [{n}, {d}]"
        )
    k = raw.get("k")
    _check_k(folder / OPENAI_CFG, k, n)
    weights = {
        "W_enc": t["encoder.weight"],
        "b_enc": t["latent_bias"],
        "W_dec": t["decoder.weight"].T,
        "b_dec": t["pre_bias"],
    }
    imported = {"format": "openai", "path": str(folder), "config": raw}
    return _sae(weights, k, _provenance(_site_of(folder, site), base_model), None, imported)


# -- the reference work's ITDA -----------------------------------------------------------------------


def read_itda_reference(folder: Path, site: str | None, base_model: str | None) -> ITDA:
    raw = _read_json(folder / CFG_FILE)
    path = folder / SPARSIFY_WEIGHTS
    size, d, k = raw.get("dictionary_size"), raw.get("d_model"), raw.get("target_l0")
    for name, value in (("dictionary_size", size), ("d_model", d), ("target_l0", k)):
        if not isinstance(value, int) or value < (0 if name == "dictionary_size" else 1):
            raise DictionaryLoadError(
                f"{folder / CFG_FILE}: {name} must be a non-negative integer, got {value!r}"
            )
    t, _ = load_tensors(path)
    missing = sorted({"xs", "ys", "mean_x", "mean_y"} - set(t))
    if missing:
        raise DictionaryLoadError(f"{path}: missing tensors {missing} of the reference ITDA format")
    if (
        t["xs"].ndim != 2
        or t["xs"].shape[1] != d
        or t["xs"].shape[0] < size
        or t["ys"].shape != t["xs"].shape
    ):
        raise DictionaryLoadError(
            f"{path}: xs/ys have shapes {list(t['xs'].shape)}/{list(t['ys'].shape)}, "
            f"cfg.json says dictionary_size={size}, d_model={d}"
        )
    xs, ys = t["xs"][:size].float(), t["ys"][:size].float()  # rows past dictionary_size are padding
    mean_x, mean_y = t["mean_x"].float(), t["mean_y"].float()
    if not (torch.isfinite(xs).all() and torch.isfinite(mean_x).all()):
        raise DictionaryLoadError(f"{path}: NaN/inf in the atoms or mean; the file is damaged")
    if not torch.equal(xs, ys) or (raw.get("subtract_mean") and not torch.equal(mean_x, mean_y)):
        raise FormatError(
            f"{path}: ys differ from xs: an ITDA transcoder (it predicts another site from this "
            "one); fluxsae's ITDA reconstructs its own input, so it cannot be imported"
        )
    if raw.get("skip_connection") and "weight" in t and t["weight"].float().abs().sum() > 0:
        raise FormatError(
            f"{path}: a skip connection ((x - mean_x) @ weight is added to every "
            "reconstruction); fluxsae's ITDA has none, so it cannot be imported exactly"
        )
    norms = xs.norm(dim=1) if size else xs.new_ones(0)
    if ((norms - 1).abs() > 1e-3).any():
        raise DictionaryLoadError(f"{path}: {int(((norms - 1).abs() > 1e-3).sum())} atoms are not unit norm")
    center = bool(raw.get("subtract_mean"))
    threshold = raw.get("loss_threshold")
    cfg = ITDAConfig(
        d_in=d,
        k=k,
        n_features=size,
        center=center,
        round_size=None,
        encoder="gradient_pursuit",
        threshold=threshold if isinstance(threshold, (int, float)) and threshold > 0 else 0.6,
        **_provenance(_site_of(folder, site), base_model),
        extra={"imported": {"format": "itda_reference", "path": str(folder), "config": raw}},
    )
    return ITDA(cfg, xs, bias=mean_x if center else None)
