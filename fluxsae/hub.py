"""Find dictionaries and label datasets: a release's short name ("shapes", see fluxsae.releases), a local
folder, or a Hugging Face Hub repo (pinned with `revision=`).

A dictionary repo holds one folder per site (see ARCHITECTURE.md, "On disk and on the Hub"):

    <repo>/config.json            root config (method, base model, sites)
    <repo>/<site>/cfg.json        the dictionary's config
    <repo>/<site>/sae.safetensors (and/or itda.safetensors + atoms.parquet)

From the Hub only `<site>/*` and `config.json` are downloaded, so a user fetches just the dictionary
they asked for; with HF_HUB_OFFLINE=1 the cache answers, and a miss names the repo, the site and the
`hf download` command that fetches it. Folders in other libraries' formats (sparsify, SAELens,
SDXL-unbox, the reference ITDA) are detected and imported (fluxsae.formats). Label datasets are parquet
shards with a card whose `configs:` make `datasets.load_dataset` read them (`load_labels`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from fluxsae.releases import get_release, resolve
from fluxsae.sites import parse_site

SHAPES = "shapes"


class DictionaryNotFoundError(FileNotFoundError):
    """The repo, folder or site asked for does not exist."""


class DictionaryMismatchError(ValueError):
    """A dictionary was trained on another model or site than the pipeline it is used with."""


def shapes_dictionaries_dir() -> Path:
    """Where the packaged Shapes dictionaries live (made by `python -m training.shapes_dictionaries`):
    `sae/` and `itda/`, each a repo in the Hub layout. They are two repos, as they would be on the Hub,
    because each `<site>/cfg.json` describes one dictionary."""
    return Path(__file__).resolve().parent / "shapes" / "dictionaries"


_WEIGHTS = {"sae": "sae.safetensors", "itda": "itda.safetensors"}
"""The weights file that marks a site folder of each method."""

Method = Literal["sae", "itda"]


def available_sites(folder: Path, weights: str) -> list[str]:
    return sorted(p.parent.name for p in folder.glob(f"*/{weights}"))


def site_folder(
    name_or_path: str | os.PathLike, site: str, weights: str, revision: str | None = None,
    loader: str | None = None,
) -> Path:  # fmt: skip
    """The local folder holding `<site>/cfg.json` and `<site>/<weights>` for a dictionary source.

    `name_or_path`: a release's short name ("shapes", see fluxsae.releases), a local repo folder (with one
    sub-folder per site), a site folder itself, or a Hub repo id ("user/name"). `weights`: the file that
    marks the wanted kind ("sae.safetensors", "itda.safetensors"); a folder of the same kind in another
    library's format (fluxsae.formats) counts too. `loader`: the function the user called, for the
    messages (default: the one of `weights`' kind).
    """
    site = str(parse_site(site))
    loader = loader or _LOADERS.get(weights, "load_dictionary")
    source = str(name_or_path)
    release = get_release(source)
    if release is not None:
        method = _METHODS[weights]
        where, revision = resolve(source, method, revision)
        if release.dictionaries[method].local_path() is None:
            root = _download(where, site, revision, loader=loader)
        else:
            root = Path(where)
            if not root.is_dir():
                raise DictionaryNotFoundError(
                    f"The packaged {source!r} dictionaries are missing ({root}); reinstall fluxsae or build "
                    "them with `python -m training.shapes_dictionaries`."
                )
    elif Path(source).exists():
        root = Path(source)
        if _holds(root, weights) and not (root / site).is_dir():
            return root  # a site folder itself
    else:
        root = _download(source, site, revision, loader=loader)
    folder = root / site
    if not _holds(folder, weights):
        have = available_sites(root, weights) or _listed_sites(root)
        raise DictionaryNotFoundError(
            f"No {weights} for site {site!r} in {source}"
            + (f"; it has: {', '.join(have)}." if have else f" ({root} holds no {weights} at all).")
        )
    return folder


_METHODS = {"sae.safetensors": "sae", "itda.safetensors": "itda"}
_LOADERS = {"sae.safetensors": "load_sae", "itda.safetensors": "load_itda"}


def _holds(folder: Path, weights: str) -> bool:
    """Whether `folder` holds a dictionary of the kind `weights` marks, in fluxsae's format or another's."""
    if (folder / weights).is_file():
        return weights != "sae.safetensors" or not _is_reference_itda(folder)
    from fluxsae.formats import OPENAI_WEIGHTS, SAELENS_WEIGHTS

    if weights == "sae.safetensors":
        return (folder / SAELENS_WEIGHTS).is_file() or (folder / OPENAI_WEIGHTS).is_file()
    return weights == "itda.safetensors" and _is_reference_itda(folder)


def _is_reference_itda(folder: Path) -> bool:
    from fluxsae.formats import detect_format

    return (folder / "sae.safetensors").is_file() and detect_format(folder) == "itda_reference"


def _listed_sites(root: Path) -> list[str]:
    """The sites a repo's root config.json lists (all a partial download may know of the others)."""
    try:
        sites = json.loads((root / "config.json").read_text()).get("sites", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [str(s) for s in sites] if isinstance(sites, list) else []


def _load_site(folder: Path, site, kind: str, device):
    """The dictionary in a site folder: fluxsae's own format read directly, others imported."""
    from fluxsae.formats import detect_format

    cls = _KINDS[kind]()
    if detect_format(folder) == "fluxsae":
        return cls.load(folder, device=device, site=site)
    return _imported(folder, site, cls, device)


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    return bool(constants.HF_HUB_OFFLINE) or env


def _download(
    repo_id: str, site: str, revision: str | None, repo_type: str = "model", *, loader: str = "load_sae"
) -> Path:
    """Download `<site>/*` and the root config.json of a Hub repo (or find them in the cache offline);
    DictionaryNotFoundError naming the repo, the site, the revision and what to do otherwise (`loader`:
    the function the user called, named in the offline hint)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {revision!r}" if revision else ""
    get = f"`hf download {repo_id} --include '{site}/*' config.json" + (
        f" --revision {revision}`" if revision else "`"
    )
    try:
        return Path(
            snapshot_download(
                repo_id, revision=revision, repo_type=repo_type, allow_patterns=[f"{site}/*", "config.json"]
            )
        )
    except HFValidationError as e:
        raise DictionaryNotFoundError(
            f"{repo_id!r} is neither a known release ({', '.join(sorted(_release_names()))}), an existing "
            f"folder, nor a valid Hub repo id ({e})."
        ) from e
    except RevisionNotFoundError as e:
        raise DictionaryNotFoundError(
            f"The Hub repo {repo_id!r} has no revision {revision!r}: pass a branch, tag or commit it has "
            f"(see its 'Files and versions' page) ({e})"
        ) from e
    except RepositoryNotFoundError as e:
        raise DictionaryNotFoundError(
            f"The Hub has no repo {repo_id!r} (or it is private or gated: `hf auth login`); check "
            f"the repo id ({e})"
        ) from e
    except LocalEntryNotFoundError as e:
        if _offline():
            hint = (
                f"HF_HUB_OFFLINE is set and the cache holds no complete copy of {site}/ of {repo_id!r}{at}: "
                f"download it once online with {get} (or {loader}(...) without HF_HUB_OFFLINE), then retry."
            )
        else:
            hint = (
                f"the Hub could not be reached and the cache holds no copy of {site}/ of {repo_id!r}{at}: "
                f"check your network (or HF_ENDPOINT), or download it with {get}."
            )
        raise DictionaryNotFoundError(
            f"Could not load site {site!r} of the Hub repo {repo_id!r}: {hint} ({e})"
        ) from e
    except Exception as e:  # network, auth, server errors: say which and what to do
        hint = (
            "HF_HUB_OFFLINE is set, so only the local cache is used: download it first with "
            f"{get}, or unset HF_HUB_OFFLINE."
            if _offline()
            else "Check the repo id, your network, and for private repos `hf auth login`."
        )
        raise DictionaryNotFoundError(
            f"Could not fetch {site}/ from the Hub repo {repo_id!r}{at}: {hint} ({type(e).__name__}: {e})"
        ) from e


def _release_names() -> list[str]:
    from fluxsae.releases import RELEASES

    return list(RELEASES)


def _direct_folder(name_or_path, site: str | None, revision, loader: str = "load_dictionary") -> Path | None:
    """A folder to load as it is, or None for fluxsae's repo layout (then `site_folder` finds the site):
    a folder in another library's format (fluxsae.formats), or a site folder given without a site. A
    foreign hookpoint ("layers.5") is a folder name, not a FLUX site, and is downloaded as such."""
    from fluxsae.formats import detect_format

    source = str(name_or_path)
    if get_release(source) is not None:
        return None
    root = Path(source)
    if root.exists():
        for folder in ([root / site] if site else []) + [root]:
            if folder.is_dir() and _has_weights(folder):
                direct = detect_format(folder) != "fluxsae" or (site is None and folder == root)
                return folder if direct else None
        return None
    if site is None or _is_site(site):
        return None  # a Hub repo in the fluxsae layout: site_folder downloads it
    folder = _download(source, site, revision, loader=loader) / site
    if not folder.is_dir():
        raise DictionaryNotFoundError(f"The Hub repo {source!r} has no folder {site!r}.")
    return folder


def _has_weights(folder: Path) -> bool:
    from fluxsae.formats import OPENAI_WEIGHTS, SAELENS_WEIGHTS

    names = ("sae.safetensors", "itda.safetensors", SAELENS_WEIGHTS, OPENAI_WEIGHTS)
    return any((folder / n).is_file() for n in names)


def _is_site(site: str) -> bool:
    try:
        parse_site(site)
    except (ValueError, TypeError):
        return False
    return True


def _imported(folder: Path, site, kind: type, device):
    from fluxsae.formats import import_dictionary

    d = import_dictionary(folder, site=site, device=device)
    if not isinstance(d, kind):
        raise DictionaryNotFoundError(
            f"{folder} holds a {type(d).__name__}, not {'an' if kind.__name__[0] in 'AEIOU' else 'a'} "
            f"{kind.__name__}; use fluxsae.load_dictionary for "
            "either kind."
        )
    return d


def _weights_of(name_or_path: str | os.PathLike, site: str, method: Method | None, revision) -> str:
    """Which weights file (so which kind) `load_dictionary` should look for."""
    if method is not None:
        if method not in _WEIGHTS:
            raise ValueError(f"method must be one of {sorted(_WEIGHTS)}, got {method!r}.")
        return _WEIGHTS[method]
    source = Path(str(name_or_path))
    if get_release(str(name_or_path)) is None and source.exists():
        for folder in (source / str(parse_site(site)), source):
            found = [w for w in _WEIGHTS.values() if (folder / w).is_file()]
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise ValueError(f"{folder} holds both an SAE and an ITDA; pass method='sae' or 'itda'.")
        return _WEIGHTS["sae"]  # site_folder then says what the folder has
    release = get_release(str(name_or_path))
    if release is not None:
        if len(release.dictionaries) > 1:
            raise ValueError(
                f"{release.name!r} packages both an SAE and an ITDA per site; pass method='sae' or 'itda'."
            )
        return _WEIGHTS[next(iter(release.dictionaries))]
    # A Hub repo holds one kind (one cfg.json per site); fetch the site and look.
    root = _download(str(name_or_path), str(parse_site(site)), revision, loader="load_dictionary")
    return _weights_of(root, site, None, revision)


def load_dictionary(
    name_or_path: str | os.PathLike,
    site: str | None = None,
    *,
    method: Method | None = None,
    device="cpu",
    revision: str | None = None,
):
    """Load the dictionary of either kind for `site` from a release ("shapes"), a local folder or a Hub
    repo id; its kind comes from the folder's files and `cfg.json` (`method` picks one where both exist).
    Folders in other libraries' formats (sparsify, SAELens, SDXL-unbox, the reference ITDA) are imported.

        d = fluxsae.load_dictionary("runs/itdas", site="transformer_blocks.3.image")
        d = fluxsae.load_dictionary("shapes", site="transformer_blocks.3.image", method="itda")
    """
    from fluxsae.dictionary import load_folder
    from fluxsae.formats import detect_format, import_dictionary

    foreign = _direct_folder(name_or_path, site, revision, "load_dictionary")
    if foreign is not None:
        d = import_dictionary(foreign, site=site, device=device)
        if method is not None and not isinstance(d, _KINDS[method]()):
            raise DictionaryNotFoundError(f"{foreign} holds a {type(d).__name__}, not method={method!r}.")
        return d
    if site is None:
        raise TypeError("load_dictionary needs site=..., e.g. site='transformer_blocks.3.image'.")
    weights = _weights_of(name_or_path, site, method, revision)
    folder = site_folder(name_or_path, site, weights, revision, loader="load_dictionary")
    if detect_format(folder) == "fluxsae":
        return load_folder(folder, device=device, site=site)
    return _imported(folder, site, _KINDS[_METHODS[weights]](), device)


def _sae_class():
    from fluxsae.sae import TopKSAE

    return TopKSAE


def _itda_class():
    from fluxsae.itda import ITDA

    return ITDA


_KINDS = {"sae": _sae_class, "itda": _itda_class}


def load_sae(name_or_path: str | os.PathLike = SHAPES, site: str | None = None, device="cpu", revision=None):
    """Load a TopK SAE for `site` from a release ("shapes"), a local folder or a Hub repo id (only
    `<site>/*` and config.json are downloaded; `revision` pins a branch, tag or commit). Folders in the
    formats of sparsify, SAELens and SDXL-unbox are detected and imported (`fluxsae.formats`); a site
    folder itself needs no site.

        sae = fluxsae.load_sae("shapes", site="transformer_blocks.3.image")
        sae = fluxsae.load_sae("EleutherAI/sae-repo", site="layers.5", revision="<commit>")
    """
    foreign = _direct_folder(name_or_path, site, revision, "load_sae")
    if foreign is not None:
        return _imported(foreign, site, _sae_class(), device)
    if site is None:
        raise TypeError("load_sae needs site=..., e.g. site='transformer_blocks.3.image'.")
    return _load_site(site_folder(name_or_path, site, "sae.safetensors", revision), site, "sae", device)


def check_matches_pipeline(dictionary, pipe) -> None:
    """Raise DictionaryMismatchError if `dictionary` was not trained on `pipe`'s model at a site it has."""
    from fluxsae.sites import site_dim

    cfg = dictionary.cfg
    base = getattr(pipe, "fluxsae_base_model", None)
    if base is not None and cfg.base_model and _model_key(base) != _model_key(cfg.base_model):
        raise DictionaryMismatchError(
            f"This dictionary was trained on {cfg.base_model!r} but the pipeline is {base!r}; load the "
            f"matching pipeline (fluxsae.load_pipeline({cfg.base_model!r})) or a dictionary trained on "
            f"{base!r}."
        )
    d = site_dim(pipe, cfg.site)
    if d != cfg.d_in:
        raise DictionaryMismatchError(
            f"The dictionary expects d_in={cfg.d_in} at {cfg.site} but the pipeline's residual width "
            f"there is {d}."
        )


def _model_key(name: str) -> str:
    return Path(name).name.lower() if os.path.isabs(name) else name.lower()


def load_itda(name_or_path: str | os.PathLike = SHAPES, site: str | None = None, device="cpu", revision=None):
    """Load an ITDA dictionary for `site` from a release ("shapes"), a local folder or a Hub repo id.

    From the Hub only `<site>/*` is downloaded (cfg.json, itda.safetensors, atoms.parquet). A folder in
    the reference work's ITDA format (cfg.json + sae.safetensors with xs, ys, ...) is imported.

        itda = fluxsae.load_itda("shapes", site="transformer_blocks.3.image")
    """
    foreign = _direct_folder(name_or_path, site, revision, "load_itda")
    if foreign is not None:
        return _imported(foreign, site, _itda_class(), device)
    if site is None:
        raise TypeError("load_itda needs site=..., e.g. site='transformer_blocks.3.image'.")
    return _load_site(site_folder(name_or_path, site, "itda.safetensors", revision), site, "itda", device)
