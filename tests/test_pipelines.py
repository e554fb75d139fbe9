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
