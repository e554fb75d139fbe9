"""`fluxsae.load_pipeline` on real objects: a tiny FluxPipeline saved to disk, bad inputs, NF4 on CPU."""

import shutil

import pytest
import torch
from conftest import generate
from torch import nn

import fluxsae.pipelines as pipelines
from fluxsae import add_to_site, capture, load_pipeline
from fluxsae.pipelines import PipelineLoadError, quantize_linear_nf4_, weight_bytes
from fluxsae.tiny import TINY_GENERATION, tiny_flux_pipeline

# Wide enough (d = 128) that linear weights dominate the transformer as in FLUX.1; at the default
# d = 32 biases, norms and embeddings are a large share and NF4 saves only ~3.6x.
WIDE = dict(num_heads=4, head_dim=32, axes_dims_rope=(8, 12, 12), t5_dim=64, clip_dim=64)
WIDE_D = 128


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(the original tiny pipeline, the folder it was saved to)."""
    pipe = tiny_flux_pipeline(seed=0)
    folder = tmp_path_factory.mktemp("pipe") / "p"
    pipe.save_pretrained(folder)
    return pipe, folder


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """(a wider tiny pipeline in full precision, its folder, the same folder loaded in NF4)."""
    pipe = tiny_flux_pipeline(seed=0, **WIDE)
    folder = tmp_path_factory.mktemp("wide") / "p"
    pipe.save_pretrained(folder)
    nf4 = load_pipeline(folder, quantize="nf4", device="cpu")
    nf4.set_progress_bar_config(disable=True)
    return pipe, folder, nf4


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_local_folder_round_trip(saved):
    from diffusers import FluxPipeline

    pipe, folder = saved
    want = generate(pipe)
    for source in (folder, str(folder)):
        loaded = _quiet(load_pipeline(source, device="cpu"))
        assert isinstance(loaded, FluxPipeline)
        assert loaded.transformer.dtype == torch.float32 and loaded.device.type == "cpu"
        # Not bit-exact: loaded weights may take other BLAS paths.
        torch.testing.assert_close(generate(loaded), want, atol=1e-5, rtol=0)
        assert loaded.fluxsae_base_model == str(folder)
        assert loaded.fluxsae_quantization is None


def test_folder_without_model_index(tmp_path):
    (tmp_path / "transformer").mkdir()
    with pytest.raises(PipelineLoadError, match="no model_index.json"):
        load_pipeline(tmp_path, device="cpu")


@pytest.mark.parametrize("source", ["not-a-folder-or-id", "a/b/c", "./missing/folder/x"])
def test_neither_folder_nor_hub_id(source):
    with pytest.raises(PipelineLoadError, match="neither an existing folder nor a Hub id"):
        load_pipeline(source, device="cpu")


def test_hub_id_offline_names_hf_hub_offline(monkeypatch):
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE once at import, so the constant is what it obeys.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PipelineLoadError, match="HF_HUB_OFFLINE") as err:
        load_pipeline("nobody/no-such-flux-model", device="cpu")
    assert "nobody/no-such-flux-model" in str(err.value) and "hf download" in str(err.value)


def test_offline_is_detected_from_the_constant_alone(monkeypatch):
    """The env var may be unset after import while huggingface_hub still runs offline."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert pipelines._hub_offline()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert not pipelines._hub_offline()


def test_unknown_quantisation(saved):
    with pytest.raises(ValueError, match="quantize must be None or 'nf4'"):
        load_pipeline(saved[1], quantize="int3", device="cpu")


@pytest.mark.parametrize(
    "weights", ["transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"]
)
@pytest.mark.parametrize("cut", ["half", "tail"])
def test_truncated_weights_name_the_file(saved, tmp_path, weights, cut):
    """diffusers raises OSError, transformers a bare SafetensorError: both name the file."""
    folder = tmp_path / "p"
    shutil.copytree(saved[1], folder)
    path = folder / weights
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if cut == "half" else data[:-100])
    with pytest.raises(PipelineLoadError) as err:
        load_pipeline(folder, device="cpu")
    assert str(path) in str(err.value)


def test_shapes_model_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(pipelines, "shapes_model_dir", lambda: tmp_path)
    with pytest.raises(PipelineLoadError, match="training.shapes_model"):
        load_pipeline("shapes", device="cpu")


def test_nf4_swaps_every_linear(wide):
    import bitsandbytes as bnb

    pipe, _, nf4 = wide
    n_linear = sum(type(m) is nn.Linear for m in pipe.transformer.modules())
    assert n_linear > 0
    assert not any(type(m) is nn.Linear for m in nf4.transformer.modules())
    quantised = [m for m in nf4.transformer.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantised) == n_linear
    assert all(m.weight.quant_state.quant_type == "nf4" for m in quantised)
    assert nf4.fluxsae_quantization == "nf4" and nf4.fluxsae_base_model == str(wide[1])


def test_nf4_memory(wide):
    pipe, _, nf4 = wide
    ratio = weight_bytes(pipe.transformer) / weight_bytes(nf4.transformer)
    assert ratio >= 3.5, ratio  # measured 6.99x at d = 128 (3.65x at the default d = 32)


def test_nf4_is_close_to_full_precision(wide):
    pipe, _, nf4 = wide
    tr = pipe.transformer
    g = torch.Generator().manual_seed(1)
    n_img, n_txt = 16, TINY_GENERATION["max_sequence_length"]
    img_ids = torch.zeros(n_img, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(n_img) // 4, torch.arange(n_img) % 4
    inputs = dict(
        hidden_states=torch.randn(1, n_img, tr.config.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, n_txt, tr.config.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, tr.config.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.75]),
        img_ids=img_ids,
        txt_ids=torch.zeros(n_txt, 3),
        return_dict=False,
    )
    with torch.no_grad():
        v_fp, v_nf4 = tr(**inputs)[0], nf4.transformer(**inputs)[0]
    rel_v = ((v_nf4 - v_fp).norm() / v_fp.norm()).item()
    assert rel_v < 0.25, rel_v  # measured 0.12-0.13 (random weights, which NF4 fits worse than trained ones)
    lat_fp, lat_nf4 = generate(pipe), generate(nf4)
    rel_lat = ((lat_nf4 - lat_fp).norm() / lat_fp.norm()).item()
    assert rel_lat < 0.15, rel_lat  # measured 0.065


def test_hooks_on_nf4(wide):
    _, _, nf4 = wide
    site = "transformer_blocks.1.image"
    with capture(nf4, site) as acts:
        plain = generate(nf4)
    assert acts[site].shape == (4, 1, 16, WIDE_D)
    with add_to_site(nf4, site, torch.ones(WIDE_D), strength=0.0):
        assert torch.equal(generate(nf4), plain)
    with add_to_site(nf4, site, torch.ones(WIDE_D), strength=1.0):
        assert not torch.equal(generate(nf4), plain)


def test_quantize_linear_nf4_counts_and_is_idempotent():
    import bitsandbytes as bnb

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 128, bias=False)))
    x = torch.randn(3, 64)
    assert quantize_linear_nf4_(model) == 2
    assert isinstance(model[0], bnb.nn.Linear4bit) and isinstance(model[2][0], bnb.nn.Linear4bit)
    y = model(x)
    assert quantize_linear_nf4_(model) == 0
    assert torch.equal(model(x), y)


# -- FLUX.1 from its configs with random weights (fluxsae.flux.random_flux_pipeline) ----------------

SMALL_FLUX = {
    "transformer": {"num_layers": 2, "num_single_layers": 1, "num_attention_heads": 2,
                    "attention_head_dim": 32, "axes_dims_rope": [8, 12, 12]},
    "text_encoder": {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64,
                     "projection_dim": 32, "num_attention_heads": 2, "vocab_size": 256},
    "text_encoder_2": {"num_layers": 1, "d_model": 48, "d_ff": 64, "num_heads": 2, "d_kv": 16,
                       "vocab_size": 256},
    "vae": {"block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4,
            "latent_channels": 4},
}  # fmt: skip
"""FLUX.1-schnell at reduced depth and width: T5 (48) and CLIP (32) widths differ from the transformer's (64),
so a width that did not follow its encoder would fail in the first generation."""


@pytest.fixture(scope="module")
def meta_schnell():
    from fluxsae.flux import random_flux_pipeline

    return random_flux_pipeline(device="meta", dtype=torch.bfloat16)


def test_full_size_flux1_on_the_meta_device_has_flux1s_parameters(meta_schnell):
    from diffusers import FluxPipeline

    from fluxsae.flux import parameter_counts
    from fluxsae.heatmap import token_grid
    from fluxsae.sites import all_sites, site_dim

    pipe = meta_schnell
    assert isinstance(pipe, FluxPipeline)
    # FLUX.1-schnell's published sizes: the 11.9B transformer, T5-XXL's 4.76B encoder, CLIP-L, the VAE.
    assert parameter_counts(pipe) == {"transformer": 11_891_178_560, "text_encoder_2": 4_762_310_656,
                                      "text_encoder": 123_060_480, "vae": 83_819_683}  # fmt: skip
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in pipe.transformer.parameters())
    assert weight_bytes(pipe.transformer) == 2 * 11_891_178_560
    assert len(all_sites(pipe.transformer)) == (19 + 38) * 2
    assert site_dim(pipe.transformer, "single_transformer_blocks.37.image") == 3072
    assert token_grid(pipe, 256, 256) == (16, 16) and token_grid(pipe, 1024, 1024) == (64, 64)
    assert pipe.tokenizer.model_max_length == 77 and pipe.tokenizer_2.model_max_length == 512
    assert not pipe.transformer.config.guidance_embeds and pipe.scheduler.config.shift == 1.0


def test_dev_is_built_with_guidance_and_a_resolution_dependent_schedule():
    from fluxsae.flux import random_flux_pipeline

    pipe = random_flux_pipeline("black-forest-labs/FLUX.1-dev", overrides=SMALL_FLUX)
    assert pipe.transformer.config.guidance_embeds and pipe.scheduler.config.use_dynamic_shifting
    g = torch.Generator().manual_seed(0)
    latents = pipe("a red circle", height=64, width=64, num_inference_steps=2, max_sequence_length=8,
                   guidance_scale=3.5, generator=g, output_type="latent").images  # fmt: skip
    assert latents.shape == (1, 16, 16) and torch.isfinite(latents).all()


def test_reduced_random_flux1_generates_is_seeded_and_round_trips_through_a_folder(tmp_path):
    from fluxsae.flux import random_flux_pipeline

    pipe = random_flux_pipeline(overrides=SMALL_FLUX, seed=3)
    assert pipe.transformer.inner_dim == 64 and pipe.transformer.config.joint_attention_dim == 48
    args = dict(height=64, width=64, num_inference_steps=2, max_sequence_length=8, guidance_scale=0.0)
    with capture(pipe, ["transformer_blocks.1.image", "single_transformer_blocks.0.text"]) as acts:
        image = pipe("a red circle", generator=torch.Generator().manual_seed(0), **args).images[0]
    assert image.size == (64, 64)  # decoded by FLUX.1's (narrowed) VAE: x8, 16 latent channels -> 4 here
    assert acts["transformer_blocks.1.image"].shape == (2, 1, 16, 64)  # 64 px -> 4 x 4 image tokens
    assert acts["single_transformer_blocks.0.text"].shape == (2, 1, 8, 64)
    same, other = (
        random_flux_pipeline(overrides=SMALL_FLUX, seed=3),
        random_flux_pipeline(overrides=SMALL_FLUX),
    )
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        a, b, c = (getattr(p, name).state_dict() for p in (pipe, same, other))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    mine, theirs = pipe.transformer.state_dict(), other.transformer.state_dict()
    assert not all(torch.equal(mine[k], theirs[k]) for k in mine)
    pipe.save_pretrained(tmp_path / "random")
    loaded = load_pipeline(tmp_path / "random", device="cpu")
    loaded.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(
        loaded("a red circle", generator=g, output_type="latent", **args).images,
        pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="latent", **args).images,
        atol=1e-5, rtol=0,
    )  # fmt: skip


def test_bad_overrides_say_what_is_wrong():
    from fluxsae.flux import apply_overrides, flux1_configs, overrides_from, random_flux_pipeline

    with pytest.raises(ValueError, match="Unknown component 'unet'"):
        random_flux_pipeline(overrides={"unet": {"num_layers": 1}}, device="meta")
    with pytest.raises(ValueError, match=r"transformer has no field\(s\) \['num_layer'\]"):
        random_flux_pipeline(overrides={"transformer": {"num_layer": 1}}, device="meta")
    with pytest.raises(ValueError, match="must sum to attention_head_dim 32"):
        apply_overrides(flux1_configs(), {"transformer": {"attention_head_dim": 32}})
    with pytest.raises(KeyError, match="No stored config"):
        flux1_configs("black-forest-labs/FLUX.2")
    assert overrides_from(["vae.block_out_channels=[8,16]", "transformer.num_layers=2", "x.y=name"]) == {
        "vae": {"block_out_channels": [8, 16]},
        "transformer": {"num_layers": 2},
        "x": {"y": "name"},
    }
    with pytest.raises(ValueError, match="COMPONENT.FIELD=VALUE"):
        overrides_from(["num_layers=2"])
