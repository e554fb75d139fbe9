"""fluxsae: sparse autoencoders and ITDA dictionaries on the residual stream of FLUX.1."""

from fluxsae.dictionary import Dictionary, DictionaryConfig, DictionaryLoadError, SparseCode
from fluxsae.formats import export_sae, import_dictionary
from fluxsae.hooks import Captured, add_to_site, capture, edit_site
from fluxsae.hub import load_dictionary, load_itda, load_sae
from fluxsae.itda import ITDA, ITDAConfig
from fluxsae.labels import load_labels
from fluxsae.pipelines import load_pipeline
from fluxsae.sae import SAEConfig, TopKSAE
from fluxsae.sites import Site, all_sites, parse_site, resolve_site
from fluxsae.steering import Directions, steer
from fluxsae.version import __version__

__all__ = [
    "ITDA",
    "Captured",
    "Dictionary",
    "Directions",
    "DictionaryConfig",
    "DictionaryLoadError",
    "ITDAConfig",
    "SAEConfig",
    "Site",
    "SparseCode",
    "TopKSAE",
    "__version__",
    "add_to_site",
    "all_sites",
    "capture",
    "edit_site",
    "export_sae",
    "import_dictionary",
    "load_dictionary",
    "load_itda",
    "load_labels",
    "load_pipeline",
    "load_sae",
    "parse_site",
    "resolve_site",
    "steer",
]
