"""ITDA: pursuit codes, greedy construction from real activations, files, resume, and provenance that
regenerates the very token an atom was taken from."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxsae.activations import ActivationStore
from fluxsae.dictionary import DictionaryLoadError
from fluxsae.evaluate import reconstruction_metrics
from fluxsae.fileio import save_tensors, write_json
from fluxsae.hub import DictionaryNotFoundError, load_itda
from fluxsae.itda import ITDA, ITDAConfig
from fluxsae.itda_build import ITDABuilder, build_itda
from fluxsae.provenance import atom_source
from fluxsae.pursuit import pursuit
from fluxsae.tiny import TINY_GENERATION, tiny_flux_pipeline
from training import build_itda as build_cmd
from training import harvest

SITE = "transformer_blocks.1.image"
PROMPTS = ["a red circle", "a blue square", "the green triangle", "a red square", "a big red circle",
           "blue", "a small blue circle", "green square"]  # fmt: skip


def unit(n, d, seed=0, dtype=torch.float32):
    a = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return a / a.norm(dim=1, keepdim=True)


def reconstruct(code, atoms):
    return torch.nn.functional.embedding_bag(
        code.indices, atoms, mode="sum", per_sample_weights=code.values
    )


# -- pursuit ----------------------------------------------------------------------------------


def naive_gradient_pursuit(x, D, k, clamp_only=False, errors=None):
    """One token at a time, dense vectors, the textbook steps (see fluxsae.itda's docstring).
    `clamp_only`: always the reference's clamped full step. `errors`: a list to append ||r||^2 to."""
    support, a, r = [], torch.zeros(0, dtype=x.dtype), x.clone()
    for _ in range(min(k, len(D))):
        ips = D @ r
        free = ips.clone()
        free[support] = -math.inf
        support.append(int(free.argmax()))  # the first of the largest, among atoms not yet chosen
        a = torch.cat([a, a.new_zeros(1)])
        g = ips[support]
        p = torch.where((a <= 0) & (g < 0), 0.0, g)
        c = D[support].T @ p
        alpha = (p @ g) / (c @ c) if c @ c > 0 else 0.0
        cap = min([(a[j] / -p[j]).item() for j in range(len(p)) if p[j] < 0], default=math.inf)
        full = (a + alpha * p).clamp(min=0)
        capped = (a + min(alpha, cap) * p).clamp(min=0)
        err = lambda v: (x - D[support].T @ v).pow(2).sum()
        a = full if clamp_only or err(full) <= err(capped) else capped
        r = x - D[support].T @ a
        if errors is not None:
            errors.append(r.pow(2).sum().item())
    return a, support


def naive_errors(x, atoms, k, bias, variance):
    """e_i = ||x_i - bias - x_hat_i||^2 / sigma^2 (fluxsae.itda's docstring), one token at a time with
    the naive pursuit, in float64: the reference for the builder's decisions."""
    D, out = atoms.double(), []
    for t in x.double() - bias.double():
        a, support = naive_gradient_pursuit(t, D, k) if len(D) else (t.new_zeros(0), [])
        out.append((t - D[support].T @ a).pow(2).sum() / variance)
    return torch.stack(out)


def total_variance(*batches):
    """sigma^2: mean squared distance of a token to the mean, over every token given."""
    x = torch.cat(batches).double()
    return (x - x.mean(0)).pow(2).sum(1).mean()


def test_gradient_pursuit_matches_a_naive_per_token_loop():
    for n, d, k in ((20, 8, 5), (12, 16, 4), (3, 8, 6)):  # overcomplete, undercomplete, k > n
        D = unit(n, d, seed=n, dtype=torch.float64)
        x = torch.randn(30, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + D[0]
        code = pursuit(x, D, k)
        for t in range(len(x)):
            a, support = naive_gradient_pursuit(x[t], D, k)
            assert code.indices[t, : len(support)].tolist() == support
            torch.testing.assert_close(code.values[t, : len(support)], a, rtol=1e-9, atol=1e-9)
            assert not code.values[t, len(support) :].any()


def test_the_error_never_rises_where_the_reference_step_raises_it():
    # Correlated atoms, as in FLUX's residual stream (a large shared component): here the reference's
    # clamped full step raises token 26's error by ~20% at the last iteration.
    g = torch.Generator().manual_seed(24)
    mu = torch.randn(32, generator=g) * 3
    D = mu + 0.6 * torch.randn(100, 32, generator=g)
    D = D / D.norm(dim=1, keepdim=True)
    x = (mu + 0.6 * torch.randn(64, 32, generator=g))[26]
    reference, ours = [x.pow(2).sum().item()], [x.pow(2).sum().item()]
    naive_gradient_pursuit(x, D, 16, clamp_only=True, errors=reference)
    naive_gradient_pursuit(x, D, 16, errors=ours)
    assert any(b > a * 1.05 for a, b in zip(reference, reference[1:], strict=False))
    assert all(b <= a * (1 + 1e-6) for a, b in zip(ours, ours[1:], strict=False))
    errors = [(x - reconstruct(pursuit(x[None], D, j), D)[0]).pow(2).sum().item() for j in range(1, 17)]
    torch.testing.assert_close(torch.tensor(errors), torch.tensor(ours[1:]), rtol=1e-4, atol=1e-5)
    assert ours[-1] < reference[-1]


def test_one_atom_is_the_brute_force_optimum():
    D, x = unit(50, 10, seed=3), torch.randn(40, 10, generator=torch.Generator().manual_seed(4))
    for method in ("gradient_pursuit", "matching_pursuit"):
        code = pursuit(x, D, 1, method)
        # the best non-negative multiple of any one atom: min_j ||x - max(0, <x, d_j>) d_j||^2
        best = (x.pow(2).sum(1, keepdim=True) - (x @ D.T).clamp(min=0).pow(2)).min(1).values
        torch.testing.assert_close((x - reconstruct(code, D)).pow(2).sum(1), best, rtol=1e-4, atol=1e-4)


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 24), d=st.integers(2, 12), k=st.integers(1, 8), seed=st.integers(0, 10_000),
    method=st.sampled_from(["gradient_pursuit", "matching_pursuit"]),
)  # fmt: skip
def test_codes_are_non_negative_k_sparse_and_error_never_grows(n, d, k, seed, method):
    D = unit(n, d, seed)
    x = torch.randn(16, d, generator=torch.Generator().manual_seed(seed + 1))
    full = pursuit(x, D, k, method)
    assert full.values.shape == full.indices.shape == (16, k)
    assert (full.values >= 0).all()
    assert ((full.values > 0).sum(1) <= min(k, n)).all()
    used = full.indices[:, : min(k, n)]
    assert all(len(set(row)) == len(row) for row in used.tolist())  # an atom is chosen once
    # Iteration i does not depend on k, so pursuits with k' = 1..k give the error after each iteration.
    errors = [x.pow(2).sum(1)] + [
        (x - reconstruct(pursuit(x, D, j, method), D)).pow(2).sum(1) for j in range(1, k + 1)
    ]
    for before, after in zip(errors, errors[1:], strict=False):
        assert (after <= before * (1 + 1e-5) + 1e-6).all()


def test_k_sparse_non_negative_combinations_are_recovered_exactly():
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(0)))
    D = q.T[:24]  # 24 orthonormal atoms
    g = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randperm(24, generator=g)[:4] for _ in range(50)])
    coef = torch.rand(50, 4, generator=g) + 0.1
    x = torch.nn.functional.embedding_bag(idx, D, mode="sum", per_sample_weights=coef)
    for method in ("gradient_pursuit", "matching_pursuit"):
        code = pursuit(x, D, 4, method)
        assert (code.indices.sort(1).values == idx.sort(1).values).all()
        torch.testing.assert_close(reconstruct(code, D), x, rtol=1e-5, atol=1e-5)


def test_dense_and_sparse_paths_agree_and_small_dictionaries_work():
    itda = ITDA(ITDAConfig(d_in=8, k=5), unit(3, 8))  # k > number of atoms
    x = torch.randn(2, 7, 8)
    codes = itda.encode(x)
    assert codes.shape == (2, 7, 3) and ((codes > 0).sum(-1) <= 3).all()
    coef, idx = itda.encode_sparse(x)
    assert coef.shape == idx.shape == (2, 7, 5)
    torch.testing.assert_close(itda.decode(codes), itda.decode_sparse(coef, idx))
    torch.testing.assert_close(itda(x).x_hat, itda.decode(codes))
    empty = ITDA(ITDAConfig(d_in=8, k=4))
    assert empty.encode(x).shape == (2, 7, 0)
    assert not empty.decode(empty.encode(x)).any() and empty.decode(empty.encode(x)).shape == x.shape
    assert not empty.decode_sparse(*empty.encode_sparse(x)).any()


# -- construction -----------------------------------------------------------------------------


def clustered(n_tokens, d=16, n_centres=64, seed=0):
    """Tokens near one of `n_centres` random directions: a dictionary of real tokens should cover them."""
    g = torch.Generator().manual_seed(seed)
    centres = unit(n_centres, d, seed=99) * 3
    pick = torch.randint(n_centres, (n_tokens,), generator=g)
    return centres[pick] * (1 + 0.2 * torch.rand(n_tokens, 1, generator=g)) + 0.05 * torch.randn(
        n_tokens, d, generator=g
    )


def manifest(n, offset=0):
    return {"prompt_id": torch.arange(offset, offset + n), "seed": torch.arange(n) + 100,
            "step": torch.zeros(n, dtype=torch.int32), "timestep": torch.ones(n),
            "token": torch.arange(offset, offset + n, dtype=torch.int32),
            "row": torch.zeros(n, dtype=torch.int32), "col": torch.zeros(n, dtype=torch.int32)}  # fmt: skip


def test_only_tokens_above_the_threshold_become_atoms():
    g = torch.Generator().manual_seed(0)
    b = ITDABuilder(ITDAConfig(d_in=6, k=2, threshold=0.4, round_size=None))
    first = torch.randn(100, 6, generator=g)
    b.add_batch(first, manifest(100))
    # The first batch meets an empty dictionary: its atoms are unit(x - bias) of the tokens whose
    # whole centred norm is above the threshold, bias being that batch's mean.
    bias = first.mean(0)
    err0 = (first - bias).double().pow(2).sum(1) / total_variance(first)
    tokens0 = b.provenance["token"].tolist()
    assert tokens0 == (err0 > 0.4).nonzero().squeeze(1).tolist()
    centred = first[tokens0] - bias
    torch.testing.assert_close(b.atoms, centred / centred.norm(dim=1, keepdim=True))
    atoms0 = b.atoms.clone()

    x = torch.randn(300, 6, generator=g)
    report = b.add_batch(x, manifest(300, offset=1000))
    # the errors the batch met: the dictionary before it, the variance of every token so far
    err = naive_errors(x, atoms0, 2, bias, total_variance(first, x))
    assert not ((err - 0.4).abs() < 1e-4).any()  # no token so close that float32 could decide it
    added_tokens = b.provenance["token"][len(atoms0) :] - 1000
    assert 0 < report.added < 300 and report.candidates == int((err > 0.4).sum())
    assert report.n_atoms == len(atoms0) + report.added == b.n_atoms
    assert report.fvu == pytest.approx(err.mean().item(), rel=1e-4)
    assert set(added_tokens.tolist()) == set((err > 0.4).nonzero().squeeze(1).tolist())
    torch.testing.assert_close(b.provenance["error"][len(atoms0) :], err[added_tokens].float())
    # `errors`, the public view of the same quantity, under the dictionary after the batch
    expected = naive_errors(x, b.atoms, 2, bias, total_variance(first, x))
    torch.testing.assert_close(b.errors(x).double(), expected, rtol=1e-4, atol=1e-5)


def test_rounds_keep_the_first_batch_from_becoming_the_dictionary():
    noise = torch.Generator().manual_seed(1)
    x = clustered(600, n_centres=10, seed=3) + 0.3 * torch.randn(600, 16, generator=noise)
    sizes = {}
    for round_size in (None, 16):
        b = ITDABuilder(ITDAConfig(d_in=16, k=2, threshold=0.3, round_size=round_size))
        b.add_batch(x)
        sizes[round_size] = b.n_atoms
        # every token of the batch is now covered (or is an atom)
        assert (naive_errors(x, b.atoms, 2, x.mean(0), total_variance(x)) <= 0.3 + 1e-5).all()
    assert sizes[None] == 600 and sizes[16] < 60  # all at once, the whole batch becomes atoms


def test_duplicates_in_a_batch_and_near_duplicates_of_atoms_are_dropped():
    d = 16
    a = unit(1, d, seed=5)[0] * 2
    b = ITDABuilder(ITDAConfig(d_in=d, k=1, threshold=1e-3, center=False))
    b.add_batch(torch.stack([a, 2 * a, a + 1e-4, -a]))  # the same direction three times, and its opposite
    assert b.n_atoms == 2 and b.provenance["token"].tolist() == [-1, -1]
    torch.testing.assert_close(b.atoms, torch.stack([a, -a]) / a.norm())
    # a candidate at cosine 0.9 to an atom is badly reconstructed (error 0.19 of its norm^2) ...
    other = unit(1, d, seed=6)[0]
    other = other - (other @ a) * a / a.norm() ** 2
    close = 0.9 * a / a.norm() + math.sqrt(1 - 0.81) * other / other.norm()
    for prune, kept in ((None, 3), (0.8, 2)):
        b2 = ITDABuilder(ITDAConfig(d_in=d, k=1, threshold=1e-3, prune_cosine=prune, center=False))
        b2.add_batch(torch.stack([a, -a]))
        b2.add_batch(torch.stack([close * 2, close * 2 + 1e-5]))
        assert b2.n_atoms == kept  # ... kept once without pruning, dropped with the reference's 0.8


def test_max_atoms_caps_the_dictionary():
    reports = []
    itda = build_itda(
        clustered(2000).split(250), d_in=16, k=2, threshold=0.05, max_atoms=40, on_batch=reports.append
    )
    assert itda.n_atoms == 40 == itda.cfg.n_features
    assert [r.n_atoms for r in reports][-1] == 40 and sum(r.added for r in reports) == 40
    uncapped = build_itda(clustered(2000).split(250), d_in=16, k=2, threshold=0.05)
    assert uncapped.n_atoms > 40 and torch.equal(uncapped.atoms[:40], itda.atoms)


def test_rerunning_a_finished_capped_build_changes_nothing(tmp_path):
    ckpt, reports = tmp_path / "ckpt.safetensors", []
    settings = dict(d_in=16, k=2, threshold=0.05, max_atoms=40, checkpoint=ckpt)
    first = build_itda(clustered(2000).split(250), **settings)
    again = build_itda(clustered(2000).split(250), **settings, on_batch=reports.append)
    assert reports == [] and again.cfg.extra["build"] == first.cfg.extra["build"]
    assert torch.equal(again.atoms, first.atoms)


def test_held_out_fvu_falls_as_the_dictionary_grows():
    train, test = clustered(3000, seed=1), clustered(1000, seed=2)
    fvus = []
    for cap in (8, 24, 48, None):
        itda = build_itda(train.split(500), d_in=16, k=2, threshold=0.05, max_atoms=cap)
        fvus.append(reconstruction_metrics(itda, test)["fvu"])
    assert all(b < a for a, b in zip(fvus, fvus[1:], strict=False)), fvus
    assert fvus[-1] < 0.1


def shared_plus_parts(n, seed, d=32):
    """FLUX-like tokens: a large shared component (mean^2 ~10x the variance) plus a non-negative mix
    of 3 of 48 parts."""
    g = torch.Generator().manual_seed(seed)
    parts = torch.randn(48, d, generator=torch.Generator().manual_seed(99))
    shared = 6 * torch.randn(d, generator=torch.Generator().manual_seed(98))
    idx = torch.stack([torch.randperm(48, generator=g)[:3] for _ in range(n)])
    coef = torch.rand(n, 3, generator=g) + 0.5
    return (coef[:, :, None] * parts[idx]).sum(1) + shared + 0.1 * torch.randn(n, d, generator=g)


def test_centred_atoms_reconstruct_tokens_with_a_shared_component_far_better_than_raw_ones():
    train, test = shared_plus_parts(2000, seed=1), shared_plus_parts(500, seed=2)
    batches = [(x, manifest(len(x), 500 * i)) for i, x in enumerate(train.split(500))]
    fvu = {}
    for center in (False, True):
        itda = build_itda(batches, d_in=32, k=4, threshold=0.1, max_atoms=64, center=center)
        fvu[center] = reconstruction_metrics(itda, test)["fvu"]
    assert fvu[True] < 0.6 * fvu[False], fvu
    # the centre is the first batch's mean; atoms are unit(token - bias), traceable to their token
    torch.testing.assert_close(itda.bias, train[:500].mean(0))
    torch.testing.assert_close(itda.decode(torch.zeros(3, 64)), itda.bias.expand(3, 32))
    i = 10
    token = train[itda.provenance[i]["token"]]
    torch.testing.assert_close(itda.atoms[i], (token - itda.bias) / (token - itda.bias).norm())
    code = itda.encode_sparse(test[:8])
    torch.testing.assert_close(itda.decode_sparse(*code), itda.decode(itda.encode(test[:8])))


def test_killed_build_resumes_to_the_same_dictionary(tmp_path):
    data = clustered(2400)
    batches = [(x, manifest(len(x), 300 * i)) for i, x in enumerate(data.split(300))]
    clean = build_itda(batches, d_in=16, k=3, threshold=0.2, prompts={5: "five"})

    def dying(n):
        for i, batch in enumerate(batches):
            if i == n:
                raise KeyboardInterrupt
            yield batch

    ckpt = tmp_path / "ckpt.safetensors"
    with pytest.raises(KeyboardInterrupt):
        build_itda(dying(5), d_in=16, k=3, threshold=0.2, checkpoint=ckpt, checkpoint_every=2)
    assert ITDABuilder.load(ckpt).batches_seen == 4
    seen = []
    resumed = build_itda(batches, d_in=16, k=3, threshold=0.2, prompts={5: "five"}, checkpoint=ckpt,
                         checkpoint_every=2, on_batch=seen.append)  # fmt: skip
    assert len(seen) == len(batches) - 4
    assert torch.equal(resumed.atoms, clean.atoms) and resumed.provenance == clean.provenance
    assert torch.equal(resumed.bias, clean.bias) and clean.bias.abs().sum() > 0
    assert resumed.cfg == clean.cfg
    with pytest.raises(ValueError, match="other settings"):
        build_itda(batches, d_in=16, k=4, threshold=0.2, checkpoint=ckpt)


# -- files ------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    data = clustered(1000)
    itda = build_itda([(data, manifest(1000))], ITDAConfig(d_in=16, k=3, threshold=0.2, site=SITE),
                      prompts={i: f"prompt {i}" for i in range(1000)})  # fmt: skip
    folder = tmp_path / "repo" / SITE
    itda.save(folder)
    return itda, folder


def test_save_load_round_trip_is_exact(saved):
    itda, folder = saved
    loaded = ITDA.load(folder)
    assert torch.equal(loaded.atoms, itda.atoms) and loaded.cfg == itda.cfg
    assert torch.equal(loaded.bias, itda.bias) and itda.cfg.center and itda.bias.abs().sum() > 0
    assert loaded.provenance == itda.provenance and loaded.provenance[3]["prompt"].startswith("prompt ")
    x = clustered(50, seed=7)
    assert torch.equal(loaded.encode(x), itda.encode(x))
    assert {p.name for p in folder.iterdir()} == {"cfg.json", "itda.safetensors", "atoms.parquet"}


def test_a_version_1_folder_without_a_bias_loads_as_an_uncentred_itda(saved):
    itda, folder = saved
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["center"]
    write_json(folder / "cfg.json", {**cfg, "format_version": 1})
    save_tensors(folder / "itda.safetensors", {"atoms": itda.atoms}, {"format_version": 1})
    old = ITDA.load(folder)
    assert not old.cfg.center and torch.equal(old.bias, torch.zeros(16))
    x = clustered(40, seed=3)
    code = pursuit(x, itda.atoms, 3)  # raw pursuit, as version 1 encoded
    assert torch.equal(old.encode_sparse(x).indices, code.indices)


def test_an_itda_never_overwrites_an_sae_in_the_same_folder(saved, tmp_path):
    from fluxsae.sae import SAEConfig, TopKSAE

    itda, _ = saved
    TopKSAE(SAEConfig(d_in=16, n_features=32, k=4, site=SITE)).save(tmp_path / "sae")
    before = {p.name: p.read_bytes() for p in (tmp_path / "sae").iterdir()}
    with pytest.raises(FileExistsError, match="belongs to a 'topk' dictionary"):
        itda.save(tmp_path / "sae")
    assert {p.name: p.read_bytes() for p in (tmp_path / "sae").iterdir()} == before


def _edit_cfg(folder, **changes):
    cfg = json.loads((folder / "cfg.json").read_text())
    write_json(folder / "cfg.json", {**cfg, **changes})


def _nan_atoms(folder):
    itda = ITDA.load(folder)
    atoms = itda.atoms.clone()
    atoms[2, 5] = math.nan
    save_tensors(folder / "itda.safetensors", {"atoms": atoms, "bias": itda.bias}, {"format_version": 2})


def _nan_bias(folder):
    itda = ITDA.load(folder)
    bias = itda.bias.clone()
    bias[3] = math.inf
    save_tensors(folder / "itda.safetensors", {"atoms": itda.atoms, "bias": bias}, {"format_version": 2})


def _drop_provenance_row(folder):
    import pyarrow.parquet as pq

    table = pq.read_table(folder / "atoms.parquet")
    pq.write_table(table.slice(0, table.num_rows - 1), folder / "atoms.parquet")


BREAKS = {
    "missing cfg": (lambda f: (f / "cfg.json").unlink(), r"cfg.json: the file is missing"),
    "missing atoms": (lambda f: (f / "itda.safetensors").unlink(), r"itda.safetensors: the file is missing"),
    "missing provenance": (lambda f: (f / "atoms.parquet").unlink(), r"atoms.parquet: the file is missing"),
    "truncated atoms": (
        lambda f: (f / "itda.safetensors").write_bytes((f / "itda.safetensors").read_bytes()[:200]),
        r"itda.safetensors: not a readable safetensors file \(truncated",
    ),
    "truncated provenance": (
        lambda f: (f / "atoms.parquet").write_bytes((f / "atoms.parquet").read_bytes()[:100]),
        r"atoms.parquet: not a readable parquet file",
    ),
    "shape mismatch": (lambda f: _edit_cfg(f, n_features=3), r"itda.safetensors: tensor atoms has .*=3"),
    "nan atoms": (_nan_atoms, r"itda.safetensors: tensor atoms has 1 NaN"),
    "nan bias": (_nan_bias, r"itda.safetensors: tensor bias has 1 NaN/inf"),
    "provenance rows": (_drop_provenance_row, r"atoms.parquet: \d+ provenance rows for \d+ atoms"),
    "newer format": (lambda f: _edit_cfg(f, format_version=99), r"cfg.json: format_version 99 is newer"),
    "unknown key": (lambda f: _edit_cfg(f, colour="red"), r"cfg.json: unknown ITDA config keys \['colour'\]"),
    "an SAE's cfg": (lambda f: _edit_cfg(f, architecture="topk"), r"cfg.json: it describes a 'topk'"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BREAKS))
def test_broken_folders_get_clear_errors(saved, case):
    _, folder = saved
    damage, message = BREAKS[case]
    damage(folder)
    with pytest.raises(DictionaryLoadError, match=message):
        ITDA.load(folder)


def test_load_itda_from_a_local_folder_in_the_hub_layout(saved):
    itda, folder = saved
    repo = folder.parent
    loaded = load_itda(repo, site=SITE)
    assert torch.equal(loaded.atoms, itda.atoms) and loaded.site == SITE
    with pytest.raises(DictionaryNotFoundError, match=f"single_transformer_blocks.0.image.*it has: {SITE}"):
        load_itda(repo, site="single_transformer_blocks.0.image")
    with pytest.raises(TypeError, match="site="):
        load_itda(repo)


# -- real activations: build command, resume, regeneration -----------------------------------


@pytest.fixture(scope="module")
def harvested(tmp_path_factory):
    root = tmp_path_factory.mktemp("itda_harvest")
    tiny_flux_pipeline(seed=0).save_pretrained(root / "model")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    g = TINY_GENERATION
    harvest.main([
        "--model", str(root / "model"), "--prompts", str(root / "prompts.txt"), "--sites", SITE,
        "--out", str(root / "h"), "--height", str(g["height"]), "--width", str(g["width"]),
        "--num-inference-steps", str(g["num_inference_steps"]), "--max-sequence-length",
        str(g["max_sequence_length"]), "--prompts-per-shard", "3", "--batch-size", "2", "--dtype", "float32",
        "--seed", "100",
    ])  # fmt: skip
    return root / "h"


def build_config(acts, **kw):
    settings = {"k": 4, "threshold": 0.3, "batch_size": 64, "held_out": 0.3, "checkpoint_every": 1, **kw}
    return build_cmd.BuildConfig(acts=str(acts), site=SITE, **settings)


def test_build_command_resumes_after_a_kill_and_never_touches_held_out_prompts(
    harvested, tmp_path, monkeypatch
):
    cfg = build_config(harvested)
    build_cmd.main(["--acts", str(harvested), "--site", SITE, "--k", "4", "--threshold", "0.3",
                    "--batch-size", "64", "--held-out", "0.3", "--checkpoint-every", "1",
                    "--work", str(tmp_path / "w1"), "--out", str(tmp_path / "out1")])  # fmt: skip
    clean = json.loads((tmp_path / "w1" / "result.json").read_text())
    itda = load_itda(tmp_path / "out1", site=SITE)
    assert clean["n_atoms"] == itda.n_atoms > 0 and clean["held_out"]["l0"] <= 4
    store = ActivationStore(harvested)
    held_out_prompts = set(range(store.shards[-1].prompts[0], len(PROMPTS)))
    assert held_out_prompts and not held_out_prompts & {p["prompt_id"] for p in itda.provenance}
    assert {p["prompt"] for p in itda.provenance} <= set(PROMPTS)

    real = build_cmd.manifest_batches

    def dying(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 3:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(build_cmd, "manifest_batches", dying)
    with pytest.raises(KeyboardInterrupt):
        build_cmd.build(cfg, tmp_path / "w2", tmp_path / "out2", progress=False)
    monkeypatch.setattr(build_cmd, "manifest_batches", real)
    resumed = build_cmd.build(cfg, tmp_path / "w2", tmp_path / "out2", progress=False)
    again = load_itda(tmp_path / "out2", site=SITE)
    assert torch.equal(again.atoms, itda.atoms) and again.provenance == itda.provenance
    assert resumed["held_out"]["fvu"] == clean["held_out"]["fvu"]
    with pytest.raises(SystemExit, match="other settings"):
        build_cmd.build(build_config(harvested, k=5), tmp_path / "w2", None, progress=False)


def test_an_atom_regenerates_from_its_provenance(harvested, tmp_path):
    build_cmd.build(build_config(harvested), tmp_path / "w", tmp_path / "out", progress=False)
    itda = load_itda(tmp_path / "out", site=SITE)
    pipe = tiny_flux_pipeline(seed=0)
    late = max(range(itda.n_atoms), key=lambda i: (itda.provenance[i]["step"], i))  # a later step, too
    for i in {0, late}:
        source = atom_source(itda, i, pipe)  # generation arguments recorded by the build command
        prov = itda.provenance[i]
        assert source.cosine > 0.999, (i, prov)
        assert source.sigma == pytest.approx(prov["timestep"])
        row, col = divmod(prov["token"], 4)  # 32 px, 4 x 4 tokens of 8 px
        assert (row, col) == (prov["row"], prov["col"])
        assert source.box == (8 * col, 8 * row, 8 * col + 8, 8 * row + 8)
        assert source.patch.size == (8, 8)
        assert source.patch.tobytes() == source.image.crop(source.box).tobytes()
        rgb = source.image.convert("RGB")
        changed = [(x, y) for x in range(32) for y in range(32)
                   if source.outlined.getpixel((x, y)) != rgb.getpixel((x, y))]  # fmt: skip
        assert changed and all(
            source.box[0] <= x < source.box[2] and source.box[1] <= y < source.box[3] for x, y in changed
        )
    with pytest.raises(IndexError, match="out of range"):
        atom_source(itda, itda.n_atoms, pipe)


def test_boolean_build_settings_have_on_and_off_flags():
    import argparse

    from training.cli import add_config_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_config_arguments(p, build_cmd.BuildConfig)
    required = ["--acts", "h", "--site", SITE]
    assert config_from_args(build_cmd.BuildConfig, p.parse_args(required)).center is True
    assert config_from_args(build_cmd.BuildConfig, p.parse_args([*required, "--no-center"])).center is False


def build_argv(acts, work, *extra):
    return ["--acts", str(acts), "--site", SITE, "--work", str(work), "--k", "4", "--threshold", "0.3",
            "--batch-size", "64", "--held-out", "0.3", *extra]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
        (["--checkpoint-every", "0"], "--checkpoint-every must be an integer >= 1, got 0"),
        (["--eval-tokens", "0"], "--eval-tokens must be an integer >= 1, got 0"),
        (["--k", "10000"], r"--k 10000 exceeds the width of transformer_blocks.1.image \(d_in=32\)"),
        (["--held-out=-1"], r"--held-out must be a number in \[0, 1\), got -1.0"),
        (["--threshold", "2"], r"--threshold must be a number in \(0, 1\], got 2.0"),
        (["--prune-cosine", "nan"], "--prune-cosine: 'nan' is not a finite number"),
        (["--site", "transformer_blocks.0.image"], "--acts .*was not harvested"),
    ],
)
def test_build_settings_that_cannot_work_are_refused_before_any_work(harvested, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        build_cmd.main(build_argv(harvested, tmp_path / "work", "--out", str(tmp_path / "out"), *extra))
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


def test_a_built_itda_is_never_replaced_by_another_build_unless_asked(harvested, tmp_path):
    out = tmp_path / "out"
    build_cmd.main(build_argv(harvested, tmp_path / "a", "--out", str(out)))
    atoms = load_itda(out, site=SITE).atoms
    with pytest.raises(SystemExit, match=r"already holds another 'itda' dictionary .*\(threshold differ\).*"
                                         "--overwrite"):  # fmt: skip
        build_cmd.main(build_argv(harvested, tmp_path / "b", "--out", str(out), "--threshold", "0.5"))
    assert not (tmp_path / "b").exists() and torch.equal(load_itda(out, site=SITE).atoms, atoms)
    build_cmd.main(build_argv(harvested, tmp_path / "a", "--out", str(out)))  # the same build again
    build_cmd.main(build_argv(harvested, tmp_path / "b", "--out", str(out), "--threshold", "0.5",
                              "--overwrite"))  # fmt: skip
    assert load_itda(out, site=SITE).cfg.threshold == 0.5
