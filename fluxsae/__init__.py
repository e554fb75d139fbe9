"""fluxsae: sparse autoencoders and ITDA dictionaries on the residual stream of FLUX.1."""

from fluxsae.hooks import Captured, add_to_site, capture, edit_site
from fluxsae.hub import load_itda, load_sae
from fluxsae.pipelines import load_pipeline
from fluxsae.sites import Site, all_sites, parse_site, resolve_site

__version__ = "0.1.0"

__all__ = [
    "Captured",
    "Site",
    "add_to_site",
    "all_sites",
    "capture",
    "edit_site",
    "load_itda",
    "load_pipeline",
    "load_sae",
    "parse_site",
    "resolve_site",
]
