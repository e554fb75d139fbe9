"""TopK SAE: sparse fast paths against the dense definition, exact folding and files, training."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from fluxsae.dictionary import DictionaryLoadError, SparseCode
from fluxsae.fileio import load_tensors
from fluxsae.formats import export_sae
from fluxsae.sae import SAEConfig, TopKSAE
from fluxsae.sae_training import make_optimizer, train_step

F64 = torch.float64


def make_sae(d_in=8, n_features=32, k=4, seed=0, dtype=F64, **cfg) -> TopKSAE:
    """An SAE with non-trivial biases, so that every term of the formulas is exercised."""
    sae = TopKSAE(SAEConfig(d_in=d_in, n_features=n_features, k=k, **cfg), generator=gen(seed), dtype=dtype)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(n_features, generator=gen(seed + 1)))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=gen(seed + 2)))
    return sae


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def anisotropic(n, d, seed=0, dtype=F64):
    """Correlated data with per-dimension scales over two decades and an offset."""
    g = gen(seed)
    mix = torch.randn(d, d, generator=g, dtype=dtype)
    scale = torch.logspace(-1, 1, d, dtype=dtype)
    offset = 3 * torch.randn(d, generator=g, dtype=dtype)
    return (torch.randn(n, d, generator=g, dtype=dtype) @ mix) * scale + offset


def dense_reference(sae: TopKSAE, x: torch.Tensor):
    """The definition, written densely: (fvu, aux_loss, z_hat) for raw x [N, d_in]."""
    z = (x - sae.norm_mean) @ sae.norm_transform
    pre = (z - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    vals, idx = pre.topk(sae.cfg.k)
    codes = torch.zeros_like(pre).scatter(1, idx, vals.relu())
    z_hat = codes @ sae.W_dec + sae.b_dec
    e = z - z_hat
    fvu = e.pow(2).sum() / (z - z.mean(0)).pow(2).sum()
    dead = sae.dead_mask()
    if sae.cfg.aux_k == 0 or not dead.any():
        return fvu, torch.zeros(()), z_hat
    aux_vals, aux_idx = pre.masked_fill(~dead, -math.inf).topk(min(sae.cfg.aux_k, int(dead.sum())))
    e_hat = torch.zeros_like(pre).scatter(1, aux_idx, aux_vals.relu()) @ sae.W_dec
    e = e.detach()
    return fvu, (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum(), z_hat


shapes = st.integers(2, 24).flatmap(  # d = 1 makes the residual constant: AuxK divides by 0
    lambda d: st.integers(1, 48).flatmap(
        lambda n: st.tuples(st.just(d), st.just(n), st.integers(1, n), st.integers(2, 40))
    )
)


# -- config ----------------------------------------------------------------------------------


def test_config_json_round_trip():
    cfg = SAEConfig(
        d_in=128,
        n_features=2048,
        k=16,
        site="transformer_blocks.3.image",
        base_model="shapes",
        steps=(0, 1, 2),
        resolution=(64, 64),
        mean_token_norm=12.5,
        extra={"fvu": 0.05},
    )
    back = SAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert back.steps == (0, 1, 2) and back.resolution == (64, 64)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"colour": "red"}, r"unknown SAE config keys \['colour'\]"),
        ({"format_version": 99}, "format_version 99 is newer"),
        ({"k": 99}, "k=99 exceeds n_features=32"),
        ({"normalization": "zca"}, "normalization must be"),
        ({"matryoshka": [8, 4]}, "matryoshka must be increasing whole widths"),
        ({"matryoshka": [0, 8]}, "matryoshka must be increasing"),
        ({"matryoshka": [8, 32]}, "between 0 and n_features=32"),
        ({"matryoshka": [8.5]}, "matryoshka must be a list of integers, got"),
        ({"batch_topk": 1}, "batch_topk must be True or False"),
        ({"threshold": -0.5}, "threshold must be a finite number >= 0"),
        ({"threshold": float("nan")}, "threshold must be a finite number, got nan"),
    ],
)
def test_config_errors_say_what_is_wrong(change, words):
    d = {**SAEConfig(d_in=8, n_features=32, k=4).to_dict(), **change}
    with pytest.raises(ValueError, match=words):
        SAEConfig.from_dict(d)


def test_config_missing_required_key():
    d = SAEConfig(d_in=8, n_features=32, k=4).to_dict()
    del d["k"]
    with pytest.raises(ValueError, match=r"lacks required keys \['k'\]"):
        SAEConfig.from_dict(d)


# -- encode / decode against the dense definition ------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16), lead=st.sampled_from([(), (3,), (2, 3)]))
def test_encode_gives_k_nonnegative_codes_per_token(shape, seed, lead):
    d, n, k, _ = shape
    sae = make_sae(d, n, k, seed)
    x = torch.randn(*lead, 5, d, generator=gen(seed), dtype=F64)
    top_acts, top_idx = sae.encode_sparse(x)
    assert top_acts.shape == top_idx.shape == (*lead, 5, k) and top_idx.dtype == torch.int64
    codes = sae.encode(x)
    assert codes.shape == (*lead, 5, n)
    assert (codes >= 0).all() and ((codes != 0).sum(-1) <= k).all()
    # The k selected are the k largest pre-activations: no unselected feature beats the smallest.
    z = x - sae.b_dec
    pre = z @ sae.W_enc.T + sae.b_enc
    kth = pre.topk(k).values[..., -1:]
    torch.testing.assert_close(codes, torch.where(pre >= kth, pre.relu(), 0))


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16), n_dead=st.integers(0, 48), aux_k=st.integers(0, 8))
def test_fused_paths_match_dense_reference_values_and_gradients(shape, seed, n_dead, aux_k):
    d, n, k, tokens = shape
    sae = make_sae(d, n, k, seed, aux_k=min(aux_k, n), dead_after_tokens=10)
    with torch.no_grad():
        sae.tokens_since_fired[: min(n_dead, n)] = 10
    sae.fit_normalization(anisotropic(64, d, seed), "pca")
    x = anisotropic(tokens, d, seed + 1).requires_grad_()
    sae.eval()  # keep the dead mask fixed between the two passes

    out = sae(x)
    fvu, aux, z_hat = dense_reference(sae, x)
    torch.testing.assert_close(out.fvu, fvu)
    torch.testing.assert_close(out.aux_loss, aux.to(F64))
    torch.testing.assert_close(out.x_hat, sae.denormalize(z_hat))

    inputs = [x, *sae.parameters()]
    r = torch.randn(tokens, d, generator=gen(seed), dtype=F64)  # also send a gradient through x_hat
    ours = torch.autograd.grad(out.fvu + 0.7 * out.aux_loss + (out.x_hat * r).sum(), inputs)
    ref = torch.autograd.grad(fvu + 0.7 * aux + (sae.denormalize(z_hat) * r).sum(), inputs, allow_unused=True)
    for name, a, b in zip(["x", "W_enc", "b_enc", "W_dec", "b_dec"], ours, ref, strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"gradient of {name}: {m}")


@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_decode_sparse_equals_decode_of_dense_codes(shape, seed):
    d, n, k, tokens = shape
    sae = make_sae(d, n, k, seed)
    sae.fit_normalization(anisotropic(64, d, seed), "standardize")
    x = anisotropic(tokens, d, seed + 1)
    x = x.view(2, -1, d) if tokens % 2 == 0 else x  # leading dims pass through
    top = sae.encode_sparse(x)
    assert isinstance(top, SparseCode)
    x_hat = sae.decode_sparse(*top)
    torch.testing.assert_close(x_hat, sae.decode(sae.encode(x)))
    torch.testing.assert_close(x_hat, sae(x).x_hat)


# -- normalisation, folding, directions ------------------------------------------------------------


@pytest.mark.parametrize("method", ["standardize", "pca", "whiten"])
def test_fold_normalization_is_exact(method):
    torch.manual_seed(0)
    d = 32
    sae = make_sae(d, 256, 8, dtype=torch.float32)
    sample = anisotropic(2000, d, dtype=torch.float32)
    sae.fit_normalization(sample, method).init_b_dec_from_data(sample)
    x = anisotropic(500, d, seed=1, dtype=torch.float32)
    folded = sae.fold_normalization()

    assert folded.cfg.normalization == method  # records what training used
    assert torch.equal(folded.norm_transform, torch.eye(d)) and not folded.norm_mean.any()
    a, b = sae.encode_sparse(x), folded.encode_sparse(x)
    assert torch.equal(a.indices.sort(-1).values, b.indices.sort(-1).values)
    torch.testing.assert_close(folded.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
    codes = sae.encode(x)
    torch.testing.assert_close(folded.decode(codes), sae.decode(codes), rtol=1e-5, atol=1e-5 * x.abs().max())
    # The weights really work on raw activations now: the plain formula, no normalisation.
    pre = (x - folded.b_dec) @ folded.W_enc.T + folded.b_enc
    torch.testing.assert_close(pre.topk(8).values.relu(), a.values.sort(-1, descending=True).values)


def test_normalization_whitens_the_sample():
    x = anisotropic(4000, 16)
    for method in ("standardize", "pca"):
        sae = make_sae(16, 32, 4).fit_normalization(x, method)
        z = sae.normalize(x)
        torch.testing.assert_close(z.mean(0), torch.zeros(16, dtype=F64), atol=1e-9, rtol=0)
        cov = z.T @ z / len(z)
        torch.testing.assert_close(cov.diagonal(), torch.ones(16, dtype=F64))
        if method == "pca":
            torch.testing.assert_close(cov, torch.eye(16, dtype=F64), atol=1e-8, rtol=0)
        torch.testing.assert_close(sae.denormalize(z), x)


@pytest.mark.parametrize("power", [0.0, 0.25, 0.5])
def test_whiten_shrinks_the_correlation_spectrum_by_its_power(power):
    x = anisotropic(4000, 16)
    sae = make_sae(16, 32, 4, normalization="whiten", whiten_power=power).fit_normalization(x)
    assert sae.cfg.normalization == "whiten"
    z = sae.normalize(x)
    torch.testing.assert_close(sae.denormalize(z), x)
    std = x.std(0, correction=0)
    corr = torch.cov(((x - x.mean(0)) / std).T, correction=0)
    # The correlation's eigenvalues e become e^(1 - 2p) with the same eigenvectors: p = 0 is plain
    # standardisation, p = 0.5 full whitening.
    eig, vec = torch.linalg.eigh(corr)
    want = vec @ torch.diag(eig.pow(1 - 2 * power)) @ vec.T
    torch.testing.assert_close(torch.cov(z.T, correction=0), want, atol=1e-8, rtol=1e-6)
    if power == 0.0:
        plain = make_sae(16, 32, 4).fit_normalization(x, "standardize")
        torch.testing.assert_close(z, plain.normalize(x))


def test_whiten_power_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"whiten_power must be a number in \[0, 0.5\]"):
        make_sae(16, 32, 4, normalization="whiten", whiten_power=0.7)


def test_flat_directions_are_not_blown_up():
    x = anisotropic(500, 8)
    x[:, 3] = 5.0  # a constant dimension
    sae = make_sae(8, 16, 2).fit_normalization(x, "standardize")
    assert torch.isfinite(sae.normalize(x)).all()
    assert sae.norm_transform.abs().max() < 1e4
    with pytest.raises(ValueError, match="zero variance"):
        make_sae(8, 16, 2).fit_normalization(torch.ones(10, 8, dtype=F64), "pca")


def test_directions_are_unit_and_parallel_to_raw_decoder_rows():
    sae = make_sae(16, 64, 4).fit_normalization(anisotropic(1000, 16), "pca")
    dirs = sae.directions
    torch.testing.assert_close(dirs.norm(dim=1), torch.ones(64, dtype=F64))
    raw = sae.fold_normalization().W_dec
    torch.testing.assert_close(torch.cosine_similarity(dirs, raw, dim=1), torch.ones(64, dtype=F64))
    # A feature's direction is where its activation moves the raw reconstruction.
    codes = torch.zeros(2, 64, dtype=F64)
    codes[1, 5] = 2.0
    step = sae.decode(codes)[1] - sae.decode(codes)[0]
    torch.testing.assert_close(step / step.norm(), dirs[5])


def test_state_dict_round_trip_keeps_the_normalization():
    sae = make_sae(16, 64, 4).fit_normalization(anisotropic(500, 16), "standardize")
    other = make_sae(16, 64, 4, seed=9)
    other.load_state_dict(sae.state_dict())
    x = anisotropic(20, 16, seed=3)
    torch.testing.assert_close(other.encode(x), sae.encode(x))
    torch.testing.assert_close(other(x).x_hat, sae(x).x_hat)


# -- files -------------------------------------------------------------------------------------------


def saved(tmp_path, **cfg):
    sae = make_sae(16, 64, 4, dtype=torch.float32, site="transformer_blocks.3.image", **cfg)
    sae.fit_normalization(anisotropic(500, 16, dtype=torch.float32), "pca")
    sae.save(tmp_path / "site")
    return sae, tmp_path / "site"


def test_save_load_round_trip_is_exact(tmp_path):
    sae, folder = saved(tmp_path, steps=(0, 1), resolution=(64, 64), mean_token_norm=3.5)
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae.safetensors"]
    loaded = TopKSAE.load(folder)
    assert loaded.cfg == sae.cfg and loaded.site == "transformer_blocks.3.image"
    assert not loaded.training
    folded = sae.fold_normalization()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(loaded, name), getattr(folded, name)), name
    x = anisotropic(50, 16, seed=2, dtype=torch.float32)
    assert torch.equal(loaded.encode(x), folded.encode(x))
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=1e-4, atol=1e-4)
    assert TopKSAE.load(folder, dtype=torch.bfloat16).W_enc.dtype == torch.bfloat16


def truncate(folder):
    path = folder / "sae.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def edit_weights(change):
    """Rewrite sae.safetensors with change(tensors) applied: a real file with a real defect."""

    def edit(folder):
        tensors, _ = load_tensors(folder / "sae.safetensors")
        change(tensors)
        save_file(tensors, str(folder / "sae.safetensors"))

    return edit


def edit_cfg(**change):
    def edit(folder):
        path = folder / "cfg.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **change}))

    return edit


@pytest.mark.parametrize(
    "damage, file, words",
    [
        (lambda f: (f / "cfg.json").unlink(), "cfg.json", "file is missing"),
        (lambda f: (f / "sae.safetensors").unlink(), "sae.safetensors", "file is missing"),
        (truncate, "sae.safetensors", "truncated or corrupt"),
        (edit_weights(lambda t: t["W_dec"][3].fill_(math.nan)), "sae.safetensors", "W_dec has 16 NaN/inf"),
        (
            edit_weights(lambda t: t.update(W_enc=t["W_enc"][:, :8].contiguous())),
            "sae.safetensors",
            r"W_enc has shape \[64, 8\] but cfg.json says n_features=64 x d_in=16",
        ),
        (edit_weights(lambda t: t.pop("b_dec")), "sae.safetensors", r"missing tensors \['b_dec'\]"),
        (edit_cfg(format_version=5), "cfg.json", "format_version 5 is newer.*upgrade fluxsae"),
        (edit_cfg(colour="red"), "cfg.json", "unknown SAE config keys"),
        (lambda f: (f / "cfg.json").write_text('{"d_in": 16,'), "cfg.json", "not valid JSON"),
    ],
)
def test_load_errors_name_the_file_and_the_problem(tmp_path, damage, file, words):
    _, folder = saved(tmp_path)
    damage(folder)
    with pytest.raises(DictionaryLoadError, match=words) as err:
        TopKSAE.load(folder)
    assert str(folder / file) in str(err.value)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_an_older_folder_loads_as_a_plain_per_token_topk_sae(tmp_path, version):
    sae, folder = saved(tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["format_version"] == 4 and cfg["matryoshka"] == [] and cfg["batch_topk"] is False
    del cfg["whiten_power"]
    if version <= 2:
        del cfg["batch_topk"], cfg["threshold"]
    if version == 1:
        del cfg["matryoshka"]
    (folder / "cfg.json").write_text(json.dumps({**cfg, "format_version": version}))
    back = TopKSAE.load(folder)
    assert back.cfg.matryoshka == () and not back.cfg.batch_topk and back.cfg.format_version == version
    x = torch.randn(5, 16, generator=gen(1))
    torch.testing.assert_close(back.encode(x), sae.encode(x))


def test_load_from_a_folder_that_does_not_exist(tmp_path):
    with pytest.raises(DictionaryLoadError, match="folder does not exist"):
        TopKSAE.load(tmp_path / "transformer_blocks.99.image")


# -- training ----------------------------------------------------------------------------------------


class SparseWorld:
    """Tokens = 4-sparse positive combinations of 256 random unit directions in d = 64, then scaled
    per dimension over two decades and offset, so that an SAE must normalise to learn well."""

    def __init__(self, d=64, n_true=256, k_true=4, seed=0):
        self.g = gen(seed)
        dirs = torch.randn(n_true, d, generator=self.g)
        self.dirs = dirs / dirs.norm(dim=1, keepdim=True)
        self.scale, self.offset = torch.logspace(-1, 1, d), 2 * torch.randn(d, generator=self.g)
        self.k_true = k_true

    def sample(self, n):
        idx = torch.randint(0, len(self.dirs), (n, self.k_true), generator=self.g)
        coef = torch.rand(n, self.k_true, generator=self.g) + 0.5
        codes = torch.zeros(n, len(self.dirs)).scatter_add(1, idx, coef)
        return (codes @ self.dirs) * self.scale + self.offset


def train_on_world(normalization="standardize", aux_k=64, steps=600, batch=512, lr=5e-3):
    """n_features = number of true directions, so a feature lost is a direction lost."""
    world = SparseWorld(seed=0)
    held_out, sample = world.sample(4096), world.sample(8192)
    cfg = SAEConfig(
        d_in=64, n_features=256, k=4, normalization=normalization, aux_k=aux_k, dead_after_tokens=2048
    )
    sae = TopKSAE(cfg, generator=gen(7))  # not the world's seed: the SAE must not start at the answer
    sae.fit_normalization(sample).init_b_dec_from_data(sample)
    opt = make_optimizer(sae, lr)
    for _ in range(steps):
        stats = train_step(sae, opt, world.sample(batch), clip_grad=10.0)
    sae.eval()
    with torch.no_grad():
        return sae, stats, sae(held_out).fvu.item()


@pytest.fixture(scope="module")
def trained():
    return train_on_world()


def prefix_fvu(sae: TopKSAE, x: torch.Tensor, width: int) -> float:
    """FVU (raw space) of x rebuilt from the SAE's codes restricted to its first `width` features."""
    with torch.no_grad():
        codes = sae.encode(x)
        codes[..., width:] = 0
        x_hat = sae.decode(codes)
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def zipf_world(d: int, n_true: int):
    """sample(n, generator) -> n tokens [n, d], each 3 of n_true fixed directions drawn with Zipf
    frequencies (exponent 1.2), coefficients in [0.5, 1.5)."""
    dirs = torch.nn.functional.normalize(torch.randn(n_true, d, generator=gen(0)), dim=1)
    zipf = 1 / torch.arange(1, n_true + 1).double() ** 1.2

    def sample(n, g):
        idx = torch.multinomial(zipf.expand(n, -1), 3, replacement=False, generator=g)
        coef = torch.rand(n, 3, generator=g, dtype=F64) + 0.5
        return torch.zeros(n, n_true, dtype=F64).scatter_add(1, idx, coef) @ dirs.double()

    return sample


def train_on_zipf(sample, fit: torch.Tensor, n_features: int, prefixes, prefix_weights=None) -> TopKSAE:
    """A k 3 SAE with Matryoshka `prefixes`, 300 steps on batches of `sample` (the same batches for every
    call), in eval mode."""
    cfg = SAEConfig(
        d_in=fit.shape[1], n_features=n_features, k=3, aux_k=32, dead_after_tokens=2048, matryoshka=prefixes
    )
    sae = TopKSAE(cfg, generator=gen(7), dtype=F64)
    sae.fit_normalization(fit).init_b_dec_from_data(fit)
    opt, batches = make_optimizer(sae, 5e-3), gen(1)
    for _ in range(300):
        train_step(sae, opt, sample(512, batches), clip_grad=10.0, prefix_weights=prefix_weights)
    return sae.eval()


def test_matryoshka_prefixes_reconstruct_alone_where_a_plain_sae_prefix_does_not():
    """Tokens are 3 of 128 directions drawn with Zipf frequencies. The same run with and without nested
    prefixes: only the Matryoshka loss makes the first 16 and 64 features a dictionary of their own (the
    most frequent directions), at a small cost on the whole one."""
    d, n_true = 32, 128
    sample = zipf_world(d, n_true)
    held_out, fit = sample(4096, gen(5)), sample(8192, gen(6))
    results = {}
    for prefixes in ((), (16, 64)):
        sae = train_on_zipf(sample, fit, n_true, prefixes)
        results[prefixes] = {w: prefix_fvu(sae, held_out, w) for w in (16, 64, n_true)}
    plain, nested = results[()], results[(16, 64)]
    assert nested[16] < plain[16] - 0.2 and nested[64] < plain[64] - 0.1, results
    assert nested[n_true] < plain[n_true] + 0.05, results


def test_matryoshka_prefix_weights_of_one_are_the_plain_loss_and_zero_drops_the_prefix():
    """The Zipf world of the test above. Weights (1, 1) train exactly as the plain Matryoshka loss;
    weights (0, 0) leave only the whole dictionary's term, so the prefixes stop reconstructing alone."""
    d, n_true = 32, 128
    sample = zipf_world(d, n_true)
    held_out, fit = sample(4096, gen(5)), sample(8192, gen(6))
    saes, results = {}, {}
    for weights in (None, (1.0, 1.0), (0.0, 0.0)):
        sae = train_on_zipf(sample, fit, n_true, (16, 64), weights)
        saes[weights], results[weights] = sae, {w: prefix_fvu(sae, held_out, w) for w in (16, 64, n_true)}
    plain, ones = saes[None].state_dict(), saes[(1.0, 1.0)].state_dict()
    assert all(torch.allclose(plain[k], ones[k], rtol=0, atol=1e-9) for k in plain)
    dropped, kept = results[(0.0, 0.0)], results[None]
    assert dropped[16] > kept[16] + 0.2 and dropped[64] > kept[64] + 0.1, results
    with pytest.raises(ValueError, match=r"one weight per Matryoshka prefix \(16, 64\), got \(1.0,\)"):
        sae = saes[None].train()
        train_step(sae, make_optimizer(sae, 5e-3), sample(64, gen(2)), prefix_weights=(1.0,))


def test_batch_topk_spends_features_where_tokens_have_more_and_encodes_by_its_threshold(tmp_path):
    """Tokens are 1-7 of 128 directions (4 on average). Trained on the same batches at k = 4,
    BatchTopK gives each token about as many features as it has, at the same mean L0 as per-token
    TopK, and after save/load encodes by the threshold it learnt. (It does not reconstruct better
    here: FVU 0.28 vs 0.23 after 300 steps, 0.23 vs 0.21 after 1,000.)"""
    d, n_true = 32, 128
    dirs = torch.nn.functional.normalize(torch.randn(n_true, d, generator=gen(0)), dim=1)

    def sample(n, g):
        count = torch.randint(1, 8, (n,), generator=g)
        keep = torch.arange(7).expand(n, -1) < count[:, None]
        idx = torch.multinomial(torch.ones(n, n_true), 7, generator=g)
        coef = (torch.rand(n, 7, generator=g) + 0.5) * keep
        return torch.zeros(n, n_true).scatter_add(1, idx, coef) @ dirs, count

    (held_out, count), (fit, _) = sample(4096, gen(5)), sample(8192, gen(6))
    results = {}
    for batch_topk in (False, True):
        cfg = SAEConfig(
            d_in=d, n_features=n_true, k=4, aux_k=32, dead_after_tokens=2048, batch_topk=batch_topk
        )
        sae = TopKSAE(cfg, generator=gen(7))
        sae.fit_normalization(fit).init_b_dec_from_data(fit)
        opt, batches = make_optimizer(sae, 5e-3), gen(1)
        for _ in range(300):
            train_step(sae, opt, sample(512, batches)[0], clip_grad=10.0)
        sae.eval()
        with torch.no_grad():
            values, _ = sae.encode_sparse(held_out)
            results[batch_topk] = (sae(held_out).fvu.item(), (values > 0).sum(-1).float(), sae)
    (fvu_topk, l0_topk, _), (fvu_batch, l0, sae) = results[False], results[True]
    assert l0_topk.unique().tolist() == [4.0]
    assert 3.0 < l0.mean() < 5.0 and l0.max() > 4 and l0.min() < 4
    assert torch.corrcoef(torch.stack([l0, count.float()]))[0, 1] > 0.6
    assert fvu_batch < min(0.35, fvu_topk + 0.1), (fvu_batch, fvu_topk)
    assert sae.cfg.slots == 16 and sae.encode_sparse(held_out).values.shape == (4096, 16)
    sae.save(tmp_path / "batch")
    back = TopKSAE.load(tmp_path / "batch")
    assert back.cfg.batch_topk and back.cfg.threshold > 0
    assert back.cfg.threshold == pytest.approx(float(sae.threshold))
    torch.testing.assert_close(back.encode(held_out), sae.encode(held_out), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="BatchTopK"):
        export_sae(back, tmp_path / "exported")


def test_training_learns_the_sparse_dictionary(trained):
    sae, stats, fvu = trained
    assert fvu < 0.1, f"held-out FVU {fvu:.3f}"
    assert stats["dead_fraction"] < 0.05 and stats["l0"] == pytest.approx(4, abs=0.1)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(256))


def test_without_normalization_the_same_run_learns_far_less(trained):
    _, stats, fvu = train_on_world(normalization="none")
    assert fvu > trained[2] + 0.08, (fvu, trained[2])
    assert stats["dead_fraction"] > 0.2


def test_auxk_keeps_features_alive_and_improves_reconstruction(trained):
    _, stats_aux, fvu_aux = trained
    _, stats, fvu = train_on_world(aux_k=0)
    assert stats["dead_fraction"] > 0.05 and stats_aux["dead_fraction"] < stats["dead_fraction"] / 3
    assert fvu > fvu_aux + 0.03, (fvu, fvu_aux)


def revival_run(aux_k, steps=40, live=12, n_true=16, d=32, batch=256):
    """k = 1; features 0..11 already represent true directions 0..11 and have a positive encoder
    bias, so they take the one slot on every token; the other 20 features are random, nearly
    silent and marked dead. True directions 12..15 are left to learn, and only a feature that
    gets a learning signal while it never wins a slot can learn them."""
    g = gen(1)
    dirs = torch.linalg.qr(torch.randn(d, d, generator=g))[0][:n_true]

    def sample(n):
        coef = torch.rand(n, 1, generator=g) + 0.5
        return coef * dirs[torch.randint(0, n_true, (n,), generator=g)]

    cfg = SAEConfig(d_in=d, n_features=32, k=1, normalization="none", aux_k=aux_k, dead_after_tokens=batch)
    sae = TopKSAE(cfg, generator=gen(2))
    with torch.no_grad():
        sae.W_dec[:live] = sae.W_enc[:live] = dirs[:live]
        sae.b_enc[:live] = 0.3
        sae.W_enc[live:] *= 0.01
        sae.tokens_since_fired[live:] = batch
    opt = make_optimizer(sae, 1e-2)
    for _ in range(steps):
        train_step(sae, opt, sample(batch))
    sae.eval()
    with torch.no_grad():
        out = sae(sample(2048))
    return out.fvu.item(), out.indices[out.values > 0].unique()


def test_an_extra_loss_term_joins_the_step_and_is_reported():
    x = anisotropic(256, 16, dtype=torch.float32)
    runs = {}
    for name, extra in {"none": None, "zero": lambda out: 0.0 * out.values.sum(),
                        "l1": lambda out: 0.5 * out.values.sum() / len(out.values)}.items():  # fmt: skip
        sae = make_sae(16, 64, 4, dtype=torch.float32).fit_normalization(x, "standardize")
        opt = make_optimizer(sae, 1e-2)
        stats = train_step(sae, opt, x, extra_loss=extra)
        runs[name] = (sae.W_enc.detach().clone(), stats)
    assert "extra_loss" not in runs["none"][1] and runs["zero"][1]["extra_loss"] == 0.0
    torch.testing.assert_close(runs["zero"][0], runs["none"][0])  # a zero term changes nothing
    assert runs["l1"][1]["extra_loss"] > 0
    assert not torch.allclose(runs["l1"][0], runs["none"][0])  # a real term moves the weights


def test_auxk_teaches_features_that_never_win_a_slot():
    fvu_plain, fired_plain = revival_run(aux_k=0)
    fvu_aux, fired_aux = revival_run(aux_k=4)
    assert (fired_plain >= 12).sum() == 0, "without AuxK the silent features stay silent"
    assert (fired_aux >= 12).sum() == 4, "with AuxK one feature per missing direction comes alive"
    assert fvu_aux < 0.05 < 0.15 < fvu_plain, (fvu_aux, fvu_plain)


def test_auxk_is_off_while_nothing_is_dead_and_firing_is_counted_in_training():
    sae = make_sae(8, 64, 2, aux_k=8, dead_after_tokens=1000)
    with torch.no_grad():
        sae.tokens_since_fired.fill_(7)
    out = sae(torch.randn(10, 8, dtype=F64))
    assert out.aux_loss.item() == 0.0
    fired = torch.zeros(64, dtype=torch.bool)
    fired[out.indices[out.values > 0]] = True
    assert torch.equal(sae.tokens_since_fired, torch.where(fired, 0, 17))
    sae.eval()
    sae(torch.randn(10, 8, dtype=F64))
    assert torch.equal(sae.tokens_since_fired, torch.where(fired, 0, 17))  # eval passes do not count


DDP_STEPS, DDP_TOKENS = 3, 32  # tokens per process and step
CLIP = 0.01  # below the gradient norm, so clipping acts on every step


def ddp_batches(mirrored: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(rank 0's tokens, rank 1's tokens) for each step. `mirrored`: rank 1's are rank 0's reflected
    through their common mean, so both halves have the global mean and half the global variance:
    then the mean of the two per-process FVUs is the FVU of the global batch, exactly, and so is the
    gradient DDP averages."""
    out = []
    for step in range(DDP_STEPS):
        a = anisotropic(DDP_TOKENS, 8, seed=100 + step)
        if mirrored:
            out.append((a, 2 * a.mean(0) - a))
        else:
            out.append((a, anisotropic(DDP_TOKENS, 8, seed=200 + step)))
    return out


def ddp_sae(aux_dead_after: int) -> TopKSAE:
    return make_sae(8, 32, 4, aux_k=4, dead_after_tokens=aux_dead_after)


def _ddp_worker(rank: int, store: str, out: str) -> None:
    """One of two processes: a few train_steps through DDP on this rank's half of each batch."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        result = {}
        # "exact": nothing is dead, so only FVU trains; "aux": features die after 10 tokens, and each
        # process's dead mask and AuxK loss are its own (train_sae syncs the counters after a step).
        for name, dead_after, mirrored in (("exact", 10**9, True), ("aux", 10, False)):
            sae = ddp_sae(dead_after)
            ddp = torch.nn.parallel.DistributedDataParallel(sae, broadcast_buffers=False)
            opt = make_optimizer(sae, 1e-2)
            for halves in ddp_batches(mirrored):
                stats = train_step(ddp, opt, halves[rank], clip_grad=CLIP)
            assert set(stats) == {"fvu", "aux_loss", "l0", "dead_fraction"}
            if name == "aux":
                assert stats["aux_loss"] > 0 and stats["dead_fraction"] > 0  # the AuxK path ran
            result.update({f"{name}.{k}": v.detach().clone() for k, v in sae.named_parameters()})
        save_file(result, f"{out}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def test_train_step_through_distributed_data_parallel(tmp_path):
    """Two real processes (gloo): they end with identical parameters, and with those of one process
    that trained on the global batch."""
    import torch.multiprocessing as mp

    # spawn, not fork: a child forked from a process whose OpenMP pool has run (the rest of the suite)
    # can deadlock in its first parallel op; it hung the suite once.
    args = (str(tmp_path / "store"), str(tmp_path))
    mp.start_processes(_ddp_worker, args=args, nprocs=2, start_method="spawn")
    rank0, _ = load_tensors(tmp_path / "rank0.safetensors")
    rank1, _ = load_tensors(tmp_path / "rank1.safetensors")
    assert list(rank0) == list(rank1)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name

    sae = ddp_sae(10**9)
    start = {k: v.detach().clone() for k, v in sae.named_parameters()}
    opt = make_optimizer(sae, 1e-2)
    for a, b in ddp_batches(mirrored=True):
        train_step(sae, opt, torch.cat([a, b]), clip_grad=CLIP)
    for k, v in sae.named_parameters():
        assert not torch.allclose(v, start[k]), k  # the comparison below compares trained weights
        torch.testing.assert_close(rank0[f"exact.{k}"], v.detach(), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(rank0["aux.W_dec"].norm(dim=1), torch.ones(32, dtype=F64))
