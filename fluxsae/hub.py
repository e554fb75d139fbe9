"""Find dictionaries: "shapes" (packaged), a local folder, or a Hugging Face Hub repo.

A dictionary repo holds one folder per site (see ARCHITECTURE.md, "On disk and on the Hub"):

    <repo>/config.json            root config
    <repo>/<site>/cfg.json        the dictionary's config
    <repo>/<site>/sae.safetensors (and/or itda.safetensors + atoms.parquet)

From the Hub only `<site>/*` and `config.json` are downloaded, so a user fetches just the
dictionary they asked for.
"""

from __future__ import annotations

import os
from pathlib import Path

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


_SHAPES_REPOS = {"sae.safetensors": "sae", "itda.safetensors": "itda"}


def available_sites(folder: Path, weights: str) -> list[str]:
    return sorted(p.parent.name for p in folder.glob(f"*/{weights}"))


def site_folder(
    name_or_path: str | os.PathLike, site: str, weights: str, revision: str | None = None
) -> Path:
    """The local folder holding `<site>/cfg.json` and `<site>/<weights>` for a dictionary source.

    `name_or_path`: "shapes", a local repo folder (with one sub-folder per site), a site folder
    itself, or a Hub repo id ("user/name").
    """
    site = str(parse_site(site))
    source = str(name_or_path)
    if source == SHAPES:
        root = shapes_dictionaries_dir() / _SHAPES_REPOS[weights]
        if not root.is_dir():
            raise DictionaryNotFoundError(
                f"The packaged Shapes dictionaries are missing ({root}); reinstall fluxsae or build "
                "them with `python -m training.shapes_dictionaries`."
            )
    elif Path(source).exists():
        root = Path(source)
        if (root / weights).is_file() and not (root / site).is_dir():
            return root  # a site folder itself
    else:
        root = _download(source, site, revision)
    folder = root / site
    if not (folder / weights).is_file():
        have = available_sites(root, weights)
        raise DictionaryNotFoundError(
            f"No {weights} for site {site!r} in {source}"
            + (f"; it has: {', '.join(have)}." if have else f" ({root} holds no {weights} at all).")
        )
    return folder


def _download(repo_id: str, site: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=[f"{site}/*", "config.json"])
        )
    except HFValidationError as e:
        raise DictionaryNotFoundError(
            f"{repo_id!r} is neither 'shapes', an existing folder, nor a valid Hub repo id ({e})."
        ) from e
    except Exception as e:  # network, auth, missing repo: say which and what to do
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        hint = (
            "HF_HUB_OFFLINE is set, so only the local cache is used: download it first with "
            f"`hf download {repo_id} --include '{site}/*'`, or unset HF_HUB_OFFLINE."
            if offline
            else "Check the repo id, your network, and for private repos `hf auth login`."
        )
        raise DictionaryNotFoundError(
            f"Could not fetch {site}/ from the Hub repo {repo_id!r}: {hint} ({e})"
        ) from e


def load_sae(name_or_path: str | os.PathLike = SHAPES, site: str | None = None, device="cpu", revision=None):
    """Load a TopK SAE for `site` from "shapes", a local folder or a Hub repo id.

    sae = fluxsae.load_sae("shapes", site="transformer_blocks.3.image")
    """
    from fluxsae.sae import TopKSAE

    if site is None:
        raise TypeError("load_sae needs site=..., e.g. site='transformer_blocks.3.image'.")
    return TopKSAE.load(site_folder(name_or_path, site, "sae.safetensors", revision), device=device)


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


def load_itda(
    name_or_path: str | os.PathLike = SHAPES, site: str | None = None, device="cpu", revision=None
):
    """Load an ITDA dictionary for `site` from "shapes", a local folder or a Hub repo id.

    From the Hub only `<site>/*` is downloaded (cfg.json, itda.safetensors, atoms.parquet).

        itda = fluxsae.load_itda("shapes", site="transformer_blocks.3.image")
    """
    from fluxsae.itda import ITDA

    if site is None:
        raise TypeError("load_itda needs site=..., e.g. site='transformer_blocks.3.image'.")
    return ITDA.load(site_folder(name_or_path, site, "itda.safetensors", revision), device=device)
