"""Known releases: short names for published dictionaries and label datasets (like SAELens' pretrained list).

    fluxsae.load_sae("shapes", site=...)         # the release named "shapes": packaged with fluxsae
    fluxsae.load_sae("user/repo", site=...)      # anything else is a folder or a Hub repo id, as given

A release names, per method ("sae", "itda"), where the dictionaries live (a Hub repo id, or a folder
packaged with fluxsae) and the revision to pin, and where its feature labels live. A FLUX.1 release is
added here once it is published, with its commit hash pinned, so a short name always means the same files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

PACKAGED = "packaged:"
"""Prefix of a source that is a folder inside the installed fluxsae package (relative to it)."""


@dataclass(frozen=True)
class Source:
    """Where one repo of a release lives."""

    repo: str
    """A Hub repo id ("user/name") or PACKAGED + a path inside the fluxsae package."""

    revision: str | None = None
    """The Hub revision to pin (a commit hash for published releases); None for packaged folders."""

    def local_path(self) -> Path | None:
        """The folder of a packaged source, None for a Hub repo."""
        if not self.repo.startswith(PACKAGED):
            return None
        return Path(__file__).resolve().parent / self.repo[len(PACKAGED) :]


@dataclass(frozen=True)
class Release:
    """A set of dictionaries (and labels) published together for one base model."""

    name: str
    """The short name users type."""

    base_model: str
    """The diffusion model the dictionaries read ("shapes" or a Hub id)."""

    dictionaries: dict[str, Source]
    """Per method ("sae", "itda"): the repo holding one folder per site."""

    labels: Source | None = None
    """The feature-label dataset (parquet shards + card), if published."""

    sites: tuple[str, ...] = ()
    """The sites the release covers (for listings and error messages)."""

    notes: str = ""
    extra: dict = field(default_factory=dict)


RELEASES: dict[str, Release] = {
    "shapes": Release(
        name="shapes",
        base_model="shapes",
        dictionaries={
            "sae": Source(PACKAGED + "shapes/dictionaries/sae"),
            "itda": Source(PACKAGED + "shapes/dictionaries/itda"),
        },
        labels=Source(PACKAGED + "shapes/labels"),
        sites=("transformer_blocks.3.image", "single_transformer_blocks.2.image"),
        notes="TopK SAEs and ITDAs of the packaged Shapes model (python -m training.shapes_dictionaries).",
    ),
}
"""Every known release by short name."""


def get_release(name: str) -> Release | None:
    """The release called `name`, or None if `name` is not a short name (then it is a folder or repo id)."""
    return RELEASES.get(str(name))


def resolve(name_or_path, method: str, revision: str | None = None) -> tuple[str, str | None]:
    """(folder or repo id, revision) for a dictionary source: a release's short name becomes its repo
    for `method` and pinned revision (an explicit `revision` wins); anything else is returned as given."""
    release = get_release(str(name_or_path))
    if release is None:
        return str(name_or_path), revision
    if method not in release.dictionaries:
        raise ValueError(
            f"The release {release.name!r} has no {method!r} dictionaries; "
            f"it has {sorted(release.dictionaries)}."
        )
    source = release.dictionaries[method]
    local = source.local_path()
    return (str(local) if local is not None else source.repo), revision or source.revision


def resolve_labels(name_or_path, revision: str | None = None) -> tuple[str, str | None]:
    """(folder or dataset repo id, revision) of a label dataset, a release's short name resolved."""
    release = get_release(str(name_or_path))
    if release is None:
        return str(name_or_path), revision
    if release.labels is None:
        raise ValueError(f"The release {release.name!r} has published no feature labels yet.")
    local = release.labels.local_path()
    return (str(local) if local is not None else release.labels.repo), revision or release.labels.revision
