"""The one dictionary interface: both kinds behave alike for every consumer; either loads from its folder."""

import json

import pytest
import torch

import fluxsae
from fluxsae.dictionary import Dictionary, DictionaryLoadError, ForwardOutput, SparseCode, load_folder
from fluxsae.hub import DictionaryNotFoundError
from fluxsae.itda import ITDA, ITDAConfig
from fluxsae.sae import SAEConfig, TopKSAE

SITES = ("transformer_blocks.3.image", "single_transformer_blocks.2.image")
SAE_REPO = fluxsae.hub.shapes_dictionaries_dir() / "sae"
PACKAGED = [(method, site) for method in ("sae", "itda") for site in SITES]


def packaged(method, site):
    return fluxsae.load_dictionary("shapes", site=site, method=method)


@pytest.fixture(scope="module")
def activations():
    """Real activations of both packaged sites: two Shapes scenes, every denoising step."""
    from fluxsae import shapes

    pipe = fluxsae.load_pipeline("shapes")
    prompts = [shapes.caption(s) for s in shapes.sample_scenes(2, seed=5)]
    with fluxsae.capture(pipe, list(SITES)) as acts:
        pipe(prompts, generator=torch.Generator().manual_seed(0), output_type="latent",
             **shapes.GENERATION_DEFAULTS)  # fmt: skip
    return {site: acts[site].reshape(-1, 128).float() for site in SITES}


@pytest.mark.parametrize("method, site", PACKAGED)
def test_every_packaged_dictionary_implements_the_interface(method, site, activations):
    d = packaged(method, site)
    tokens = activations[site][:300]
    assert isinstance(d, Dictionary) and isinstance(d, TopKSAE if method == "sae" else ITDA)
    assert d.site == site == d.cfg.site and d.d_in == 128 and d.n_features == d.cfg.n_features == 2048
    assert d.mean_token_norm == d.cfg.mean_token_norm > 0
    x = tokens.view(3, 100, 128)  # any leading shape
    code = d.encode_sparse(x)
    assert isinstance(code, SparseCode) and code.values.shape == code.indices.shape == (3, 100, d.cfg.k)
    assert (code.values >= 0).all() and code.indices.dtype == torch.int64
    dense = d.encode(x)
    assert dense.shape == (3, 100, 2048) and ((dense != 0).sum(-1) <= d.cfg.k).all()
    # the dense codes hold exactly the sparse ones
    torch.testing.assert_close(dense.gather(-1, code.indices), code.values, rtol=0, atol=0)
    torch.testing.assert_close(d.decode(dense), d.decode_sparse(*code), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(d.reconstruct(x), d.decode_sparse(*code))
    dirs = d.directions
    assert dirs.shape == (2048, 128)
    torch.testing.assert_close(dirs.norm(dim=1), torch.ones(2048), rtol=0, atol=1e-5)
    out = d(x.reshape(-1, 128))
    assert isinstance(out, ForwardOutput) and out.x_hat.shape == (300, 128) and 0 < out.fvu.item() < 0.2


@pytest.mark.parametrize("method, site", PACKAGED)
def test_load_dictionary_reads_either_kind_from_its_cfg_json(method, site, activations):
    root = SAE_REPO.parent / method
    by_folder = fluxsae.load_dictionary(root, site=site)  # the repo folder: kind from the site's files
    by_site_folder = load_folder(root / site)  # the site folder: kind from cfg.json
    by_name = packaged(method, site)
    x = activations[site][:50]
    for d in (by_folder, by_site_folder):
        assert type(d) is type(by_name)
        assert torch.equal(d.encode(x), by_name.encode(x))


def test_shapes_needs_a_method_and_a_folder_needs_a_site(tmp_path):
    with pytest.raises(ValueError, match="method='sae' or 'itda'"):
        fluxsae.load_dictionary("shapes", site=SITES[0])
    with pytest.raises(TypeError, match="site="):
        fluxsae.load_dictionary("shapes", method="sae")
    with pytest.raises(DictionaryNotFoundError, match="it has: "):
        fluxsae.load_dictionary(SAE_REPO, site="single_transformer_blocks.0.text")


def test_each_config_refuses_the_other_kind_and_names_the_way_out(tmp_path):
    sae = TopKSAE(SAEConfig(d_in=16, n_features=32, k=4, site=SITES[0]))
    sae.save(tmp_path / "sae")
    atoms = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    ITDA(ITDAConfig(d_in=16, k=4, site=SITES[0]), atoms).save(tmp_path / "itda")
    with pytest.raises(DictionaryLoadError, match="describes a 'topk' dictionary.*load_dictionary"):
        ITDA.load(tmp_path / "sae")
    with pytest.raises(DictionaryLoadError, match="describes a 'itda' dictionary.*load_dictionary"):
        TopKSAE.load(tmp_path / "itda")
    assert isinstance(load_folder(tmp_path / "sae"), TopKSAE)
    assert isinstance(load_folder(tmp_path / "itda"), ITDA)
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "jumprelu"}))
    known = r"unknown architecture 'jumprelu'.*reads \['itda', 'topk'\]"
    with pytest.raises(DictionaryLoadError, match=known):
        load_folder(tmp_path / "sae")


def test_both_configs_share_the_provenance_fields_and_round_trip():
    common = dict(site=SITES[1], base_model="shapes", base_revision="abc", mean_token_norm=3.5, steps=(0, 1),
                  resolution=(64, 64), dtype="bfloat16", quantization="nf4", extra={"a": 1})  # fmt: skip
    for cfg in (SAEConfig(d_in=8, n_features=16, k=2, **common), ITDAConfig(d_in=8, k=2, **common)):
        again = type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert again == cfg
        assert {k: getattr(again, k) for k in common} == common
        assert again.fluxsae_version == fluxsae.__version__
        assert again.format_version == type(cfg).FORMAT_VERSION
