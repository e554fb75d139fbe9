import pytest
from hypothesis import given
from hypothesis import strategies as st

from fluxsae.flux import meta_transformer
from fluxsae.sites import Site, SiteError, all_sites, parse_site, resolve_site, site_dim, validate_site


def test_parse_round_trip():
    s = parse_site("transformer_blocks.18.image")
    assert s == Site("transformer_blocks", 18, "image")
    assert str(s) == "transformer_blocks.18.image"
    assert s.module_path == "transformer_blocks.18"
    assert parse_site("single_transformer_blocks.9.text").output_position == 0


@given(
    kind=st.sampled_from(["transformer_blocks", "single_transformer_blocks"]),
    index=st.integers(0, 10_000),
    stream=st.sampled_from(["image", "text"]),
)
def test_str_parse_is_identity(kind, index, stream):
    s = Site(kind, index, stream)
    assert parse_site(str(s)) == s


@pytest.mark.parametrize(
    "bad, words",
    [
        ("transformer_blocks.18", "Malformed"),
        ("transformer_blocks.18.image.x", "Malformed"),
        ("transformer_blocks.018.image", "Malformed"),
        ("transformer_blocks.-1.image", "Malformed"),
        ("Transformer_Blocks.1.image", "Malformed"),
        ("double_blocks.18.image", "transformer_blocks, single_transformer_blocks"),
        ("transformer_blocks.18.img", "image, text"),
        ("", "Malformed"),
    ],
)
def test_malformed_sites_say_what_is_valid(bad, words):
    with pytest.raises(SiteError, match=words):
        parse_site(bad)


def test_non_string_site():
    with pytest.raises(SiteError, match="must be a string"):
        parse_site(18)


def test_out_of_range_names_the_valid_range(shared_tiny_pipe):
    with pytest.raises(SiteError, match=r"valid indices 0-1"):
        validate_site(shared_tiny_pipe, "transformer_blocks.2.image")
    with pytest.raises(SiteError, match=r"has 2 single_transformer_blocks"):
        validate_site(shared_tiny_pipe, "single_transformer_blocks.7.text")


def test_resolve_returns_the_diffusers_block(shared_tiny_pipe):
    site, block = resolve_site(shared_tiny_pipe, "single_transformer_blocks.1.image")
    assert block is shared_tiny_pipe.transformer.single_transformer_blocks[1]
    assert type(block).__name__ == "FluxSingleTransformerBlock"
    site, block = resolve_site(shared_tiny_pipe.transformer, "transformer_blocks.0.text")
    assert type(block).__name__ == "FluxTransformerBlock"


def test_not_a_flux_model():
    import torch

    with pytest.raises(SiteError, match="FluxTransformer2DModel"):
        validate_site(torch.nn.Linear(2, 2), "transformer_blocks.0.image")


def test_flux1_schnell_geometry_on_meta_device():
    transformer = meta_transformer("black-forest-labs/FLUX.1-schnell")
    assert next(transformer.parameters()).device.type == "meta"
    sites = all_sites(transformer)
    assert len(sites) == (19 + 38) * 2
    for s in sites:
        validate_site(transformer, s)
    assert site_dim(transformer, "transformer_blocks.18.image") == 3072
    assert str(sites[-1]) == "single_transformer_blocks.37.text"
    # The reference work's four sites all exist.
    for s in [
        "transformer_blocks.18.image",
        "transformer_blocks.9.image",
        "single_transformer_blocks.9.image",
        "single_transformer_blocks.18.image",
    ]:
        validate_site(transformer, s)
    with pytest.raises(SiteError, match="valid indices 0-18"):
        validate_site(transformer, "transformer_blocks.19.image")
    with pytest.raises(SiteError, match="valid indices 0-37"):
        validate_site(transformer, "single_transformer_blocks.38.image")
    n_params = sum(p.numel() for p in transformer.parameters())
    assert 11.5e9 < n_params < 12.5e9  # "a 12B MMDiT"
