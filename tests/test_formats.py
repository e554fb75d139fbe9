"""Other libraries' formats: import gives each library's own encodings, export loads back into the library.

Checked against the real libraries where they install (eai-sparsify 1.3.3, sae-lens 6.x: the `interop`
extra); SDXL-unbox and the reference ITDA are not packaged, so their files are written exactly as their
code writes them and their forward is the formula of that code.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import save_file

import fluxsae
from fluxsae.dictionary import DictionaryLoadError
from fluxsae.formats import FormatError, detect_format, export_sae, import_dictionary
from fluxsae.itda import ITDA
from fluxsae.sae import SAEConfig, TopKSAE

D, N, K, TOKENS = 64, 256, 8, 10_000
SITE = "transformer_blocks.3.image"


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def x():
    return torch.randn(TOKENS, D, generator=torch.Generator().manual_seed(0)) * 3 + 1


def random_weights(seed=1, scale_dec=True):
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(N, D, generator=g) / math.sqrt(D)
    W_dec = torch.randn(N, D, generator=g) * (torch.rand(N, 1, generator=g) + 0.5 if scale_dec else 1)
    return {
        "W_enc": W_enc,
        "b_enc": torch.randn(N, generator=g) * 0.1,
        "W_dec": W_dec,
        "b_dec": torch.randn(D, generator=g),
    }


def dense_topk(pre, k):
    """relu(topk(pre)) scattered into a dense [N, n] tensor (the formula all TopK formats share)."""
    vals, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())


# -- sparsify ----------------------------------------------------------------------------------------


def write_sparsify(folder, w, **cfg):
    folder.mkdir(parents=True)
    save_file(
        {
            "encoder.weight": w["W_enc"],
            "encoder.bias": w["b_enc"],
            "W_dec": w["W_dec"],
            "b_dec": w["b_dec"],
            **cfg.pop("extra_tensors", {}),
        },
        str(folder / "sae.safetensors"),
    )
    base = {
        "activation": "topk",
        "expansion_factor": N // D,
        "normalize_decoder": True,
        "num_latents": N,
        "k": K,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": D,
    }
    (folder / "cfg.json").write_text(json.dumps({**base, **cfg}))


def test_sparsify_import_matches_sparsify_forward(tmp_path, x):
    sparsify = pytest.importorskip("sparsify")
    folder = tmp_path / "layers.5"
    write_sparsify(folder, random_weights())
    theirs = sparsify.SparseCoder.load_from_disk(folder)
    ours = fluxsae.load_sae(folder)  # format detected; a foreign hookpoint name needs no site
    assert detect_format(folder) == "sparsify" and isinstance(ours, TopKSAE)
    with torch.no_grad():
        out = theirs.encode(x)
        codes = torch.zeros(TOKENS, N).scatter_(-1, out.top_indices, out.top_acts)
        assert rel(ours.encode(x), codes) < 1e-5
        assert rel(ours.decode(codes), theirs.decode(out.top_acts, out.top_indices)) < 1e-5
        assert rel(ours.reconstruct(x), theirs(x).sae_out) < 1e-5
    assert ours.cfg.extra["imported"]["format"] == "sparsify"


def trained_like_sae(x, normalization, seed=5):
    """An SAE with a fitted input normalisation (folded into the weights on save and export)."""
    cfg = SAEConfig(d_in=D, n_features=N, k=K, site=SITE, base_model="shapes", mean_token_norm=4.5)
    sae = TopKSAE(cfg, generator=torch.Generator().manual_seed(seed))
    return sae.fit_normalization(x[:2000], normalization).init_b_dec_from_data(x[:2000])


def same_support(a, b) -> float:
    """Fraction of tokens whose active features are the same set in both dense codes."""
    return ((a > 0) == (b > 0)).all(-1).float().mean().item()


def test_export_sparsify_loads_in_sparsify_with_identical_codes(tmp_path, x):
    sparsify = pytest.importorskip("sparsify")
    sae = trained_like_sae(x, "standardize")
    export_sae(sae, tmp_path / SITE, format="sparsify")
    theirs = sparsify.SparseCoder.load_from_disk(tmp_path / SITE)
    saved = sae.fold_normalization()  # what sae.save() writes: the same folded weights
    with torch.no_grad():
        out = theirs.encode(x)
        codes = torch.zeros(TOKENS, N).scatter_(-1, out.top_indices, out.top_acts)
        assert rel(codes, saved.encode(x)) < 1e-6 and rel(theirs(x).sae_out, saved.reconstruct(x)) < 1e-6
        # Against the unfolded SAE, float32 rounding of the fold can swap a near-tie at the k-th feature
        # (measured: 1 token of 10,000 in 2 of 20 random SAEs), so the support is compared per token.
        assert same_support(codes, sae.encode(x)) > 0.999
    back = fluxsae.load_sae(tmp_path, site=SITE)
    assert back.cfg == sae.cfg  # the fluxsae config travels in the safetensors metadata
    assert rel(back.encode(x), saved.encode(x)) < 1e-6


def test_sparsify_refuses_what_a_topk_sae_cannot_be(tmp_path):
    w = random_weights()
    write_sparsify(tmp_path / "skip", w, skip_connection=True, extra_tensors={"W_skip": torch.eye(D)})
    with pytest.raises(FormatError, match="W_skip"):
        import_dictionary(tmp_path / "skip")
    write_sparsify(
        tmp_path / "zero_skip", w, skip_connection=True, extra_tensors={"W_skip": torch.zeros(D, D)}
    )
    assert isinstance(import_dictionary(tmp_path / "zero_skip"), TopKSAE)  # a zero skip changes nothing
    write_sparsify(tmp_path / "tc", w, transcode=True)
    with pytest.raises(FormatError, match="transcoder"):
        import_dictionary(tmp_path / "tc")
    write_sparsify(tmp_path / "gm", w, activation="groupmax")
    with pytest.raises(FormatError, match="groupmax"):
        import_dictionary(tmp_path / "gm")
    write_sparsify(tmp_path / "badk", w, k=N + 1)
    with pytest.raises(DictionaryLoadError, match="k must be"):
        import_dictionary(tmp_path / "badk")


# -- SAELens -----------------------------------------------------------------------------------------


def write_saelens(folder, w, **cfg):
    folder.mkdir(parents=True)
    tensors = {
        "W_enc": w["W_enc"].T.contiguous(),
        "b_enc": w["b_enc"],
        "W_dec": w["W_dec"],
        "b_dec": w["b_dec"],
    }
    save_file({**tensors, **cfg.pop("extra_tensors", {})}, str(folder / "sae_weights.safetensors"))
    base = {
        "architecture": "topk",
        "d_in": D,
        "d_sae": N,
        "k": K,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": False,
        "metadata": {"sae_lens_version": "6.5.0", "hook_name": "blocks.3.hook_resid_post", "model_name": "m"},
    }
    (folder / "cfg.json").write_text(json.dumps({**base, **cfg}))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"apply_b_dec_to_input": False},
        {"rescale_acts_by_decoder_norm": True},
        {"apply_b_dec_to_input": False, "rescale_acts_by_decoder_norm": True},
    ],
    ids=["plain", "no_b_dec_on_input", "rescaled", "both"],
)
def test_saelens_topk_import_matches_saelens_forward(tmp_path, x, options):
    sae_lens = pytest.importorskip("sae_lens")
    write_saelens(tmp_path / "sae", random_weights(), **options)
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "sae")
    ours = fluxsae.load_sae(tmp_path / "sae")
    assert ours.cfg.base_model == "m" and ours.cfg.site == ""  # the hook is not a FLUX site
    with torch.no_grad():
        codes = theirs.encode(x)
        assert rel(ours.encode(x), codes) < 1e-5
        assert rel(ours.decode(codes), theirs.decode(codes)) < 1e-5
        assert rel(ours.reconstruct(x), theirs(x)) < 1e-5


def test_export_saelens_loads_in_saelens_with_identical_codes(tmp_path, x):
    sae_lens = pytest.importorskip("sae_lens")
    sae = trained_like_sae(x, "pca")
    export_sae(sae, tmp_path / SITE, format="saelens")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / SITE)
    assert type(theirs).__name__ == "TopKSAE" and theirs.cfg.metadata.hook_name == SITE
    saved = sae.fold_normalization()
    with torch.no_grad():
        codes = theirs.encode(x)
        assert rel(codes, saved.encode(x)) < 1e-6 and rel(theirs(x), saved.reconstruct(x)) < 1e-6
        assert same_support(codes, sae.encode(x)) > 0.999
    back = fluxsae.load_sae(tmp_path, site=SITE)
    assert back.cfg == sae.cfg and rel(back.encode(x), saved.encode(x)) < 1e-6


def test_saelens_jumprelu_and_per_token_norms_are_refused_with_the_reason(tmp_path):
    w = random_weights()
    write_saelens(tmp_path / "jr", w, architecture="jumprelu", extra_tensors={"threshold": torch.zeros(N)})
    with pytest.raises(FormatError, match="varies per token.*SAE.load_from_disk"):
        fluxsae.load_sae(tmp_path / "jr")
    write_saelens(tmp_path / "ln", w, normalize_activations="layer_norm")
    with pytest.raises(FormatError, match="layer_norm"):
        import_dictionary(tmp_path / "ln")
    write_saelens(tmp_path / "std", w, architecture="standard")
    with pytest.raises(FormatError, match="not a TopK"):
        import_dictionary(tmp_path / "std")


def test_saelens_pre_6_topk_spelling_is_read(tmp_path, x):
    w = random_weights()
    write_saelens(
        tmp_path / "old",
        w,
        architecture="standard",
        activation_fn_str="topk",
        activation_fn_kwargs={"k": K},
        metadata={},
    )
    ours = import_dictionary(tmp_path / "old")
    pre = (x - w["b_dec"]) @ w["W_enc"].T + w["b_enc"]
    assert rel(ours.encode(x), dense_topk(pre, K)) < 1e-5


# -- OpenAI-style TopK (SDXL-unbox) ---------------------------------------------------------------


def write_openai(folder, w, nested=True, **extra):
    """As SDXL-unbox's save_to_disk writes: config.json + torch.save({"state_dict": ...})."""
    folder.mkdir(parents=True)
    sd = {
        "encoder.weight": w["W_enc"],
        "decoder.weight": w["W_dec"].T.contiguous(),
        "pre_bias": w["b_dec"],
        "latent_bias": w["b_enc"],
        "stats_last_nonzero": torch.zeros(N, dtype=torch.long),
        **extra,
    }
    torch.save({"state_dict": sd} if nested else sd, folder / "state_dict.pth")
    cfg = {"n_dirs_local": N, "d_model": D, "k": K, "auxk": 32, "dead_steps_threshold": 1000}
    (folder / "config.json").write_text(json.dumps(cfg))


def test_openai_import_matches_its_forward(tmp_path, x):
    w = random_weights()
    write_openai(tmp_path / "unet.down_blocks.2", w)
    ours = fluxsae.load_sae(tmp_path / "unet.down_blocks.2")
    # SDXL-unbox: latents = relu(topk(encoder(x - pre_bias) + latent_bias))
    #             recons = decoder(latents) + pre_bias
    latents = dense_topk((x - w["b_dec"]) @ w["W_enc"].T + w["b_enc"], K)
    assert rel(ours.encode(x), latents) < 1e-5
    assert rel(ours.decode(latents), latents @ w["W_dec"] + w["b_dec"]) < 1e-5
    write_openai(tmp_path / "flat", w, nested=False)
    assert torch.equal(import_dictionary(tmp_path / "flat").W_dec, ours.W_dec)


def test_openai_pickles_with_code_are_never_run(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    w = random_weights()
    write_openai(tmp_path / "evil", w)
    torch.save(
        {"state_dict": {"encoder.weight": w["W_enc"]}, "x": Evil()}, tmp_path / "evil" / "state_dict.pth"
    )
    with pytest.raises(DictionaryLoadError, match="weights_only"):
        import_dictionary(tmp_path / "evil")
    write_openai(tmp_path / "ln", w, activation="TopK")
    with pytest.raises(FormatError, match="layer-normalises"):
        import_dictionary(tmp_path / "ln")


# -- the reference work's ITDA -----------------------------------------------------------------------


def reference_grad_pursuit(signal, dictionary, k):
    """The reference ITDA's encoder (grad_pursuit in its itda.py), for comparison."""
    weights = torch.zeros(signal.shape[0], dictionary.shape[0], dtype=signal.dtype)
    for _ in range(k):
        residual = signal - weights @ dictionary
        ips = residual @ dictionary.T
        selected = (weights != 0).scatter(1, ips.argmax(1, keepdim=True), True)
        grad = selected * ips
        c = grad @ dictionary
        step = (c * residual).sum(1) / (c * c).sum(1).clamp_min(1e-3)
        weights = (weights + step[:, None] * grad).relu()
    return weights.topk(k, dim=-1)


def write_itda_reference(folder, atoms, mean, *, subtract_mean=True, ys=None):
    folder.mkdir(parents=True)
    size = atoms.shape[0]
    padded = 2 ** math.ceil(max(4, math.log2(size)))
    xs = torch.full((padded, D), float("nan"))  # the buffer past dictionary_size is uninitialised
    xs[:size] = atoms
    ys_t = xs.clone()
    if ys is not None:
        ys_t[:size] = ys
    save_file(
        {
            "xs": xs,
            "ys": ys_t,
            "mean_x": mean,
            "mean_y": mean.clone(),
            "weight": torch.empty(D, D).fill_(float("nan")),
        },
        str(folder / "sae.safetensors"),
    )
    cfg = {
        "d_model": D,
        "target_l0": K,
        "loss_threshold": 0.4,
        "add_error": False,
        "subtract_mean": subtract_mean,
        "fvu_loss": True,
        "start_size": 0,
        "error_k": None,
        "skip_connection": False,
        "preprocessing_steps": 1,
        "dictionary_size": size,
        "steps": 10,
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))


def test_reference_itda_imports_with_its_own_codes_and_decode(tmp_path, x):
    g = torch.Generator().manual_seed(3)
    atoms = torch.nn.functional.normalize(torch.randn(100, D, generator=g), dim=1)
    mean = torch.randn(D, generator=g)
    write_itda_reference(tmp_path / "itda", atoms, mean)
    assert detect_format(tmp_path / "itda") == "itda_reference"
    ours = fluxsae.load_dictionary(tmp_path / "itda", site=SITE, method="itda")
    assert isinstance(ours, ITDA) and ours.site == SITE and ours.n_features == 100
    vals, idx = reference_grad_pursuit(x - mean, atoms, K)
    codes = torch.zeros(TOKENS, 100).scatter_add_(1, idx, vals)
    theirs = codes @ atoms + mean
    assert rel(ours.decode_sparse(vals, idx), theirs) < 1e-6 and rel(ours.decode(codes), theirs) < 1e-6
    # fluxsae's pursuit takes the reference's step unless it would raise the error: here it never does
    assert rel(ours.encode(x), codes) < 1e-5
    fvu = lambda x_hat: ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()  # noqa: E731
    assert fvu(ours.reconstruct(x)) <= fvu(theirs) * 1.0001
    ours.save(tmp_path / "native")  # and it is then an ordinary fluxsae ITDA
    assert torch.equal(ITDA.load(tmp_path / "native").atoms, atoms)


def test_reference_itda_transcoders_are_refused(tmp_path):
    atoms = torch.nn.functional.normalize(torch.randn(20, D), dim=1)
    write_itda_reference(tmp_path / "tc", atoms, torch.zeros(D), ys=atoms.flip(0))
    with pytest.raises(FormatError, match="transcoder"):
        import_dictionary(tmp_path / "tc")


def test_export_refuses_other_formats_and_kinds(tmp_path):
    sae = TopKSAE(SAEConfig(d_in=D, n_features=N, k=K))
    with pytest.raises(ValueError, match="sparsify"):
        export_sae(sae, tmp_path, format="onnx")
    itda = ITDA(dataclasses.replace(fluxsae.ITDAConfig(d_in=D, k=K)), torch.eye(D))
    with pytest.raises(TypeError, match="TopK"):
        export_sae(itda, tmp_path)
    with pytest.raises(DictionaryLoadError, match="no dictionary weights"):
        detect_format(tmp_path / "empty")


def test_a_site_folder_of_any_format_loads_without_a_site_and_the_kind_is_checked(tmp_path):
    sae = TopKSAE(SAEConfig(d_in=D, n_features=N, k=K, site=SITE))
    sae.save(tmp_path / SITE)
    assert fluxsae.load_sae(tmp_path / SITE).cfg == sae.cfg  # fluxsae's own format
    assert isinstance(fluxsae.load_dictionary(tmp_path / SITE), TopKSAE)
    with pytest.raises(fluxsae.hub.DictionaryNotFoundError, match="holds a TopKSAE, not an ITDA"):
        fluxsae.load_itda(tmp_path / SITE)
    with pytest.raises(TypeError, match="site="):
        fluxsae.load_sae(tmp_path)  # a repo folder: which site?
