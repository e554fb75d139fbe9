"""Training SAEs on harvested activations: it learns, it resumes where it was killed, two DDP
processes agree with one, and the result loads back with `load_sae` and works spliced into a pipeline."""

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fluxsae
from fluxsae.activations import ActivationStore, ActivationStoreError
from fluxsae.evaluate import reconstruction_metrics, spliced_effect
from fluxsae.hub import DictionaryMismatchError, DictionaryNotFoundError, check_matches_pipeline
from fluxsae.sae import ForwardOutput, SAEConfig, TopKSAE
from fluxsae.sae_training import scene_consistency, scene_decorrelation, scene_overlap
from fluxsae.shapes.truth import auroc
from fluxsae.tiny import TINY_GENERATION, tiny_flux_pipeline
from training import build_itda as build_cmd
from training import harvest, shapes_model, train_sae
from training.cli import add_config_arguments, config_from_args, field_docs
from training.work import claim

SITE = "transformer_blocks.1.image"
REPO = Path(__file__).resolve().parents[1]
WORDS = ["red", "green", "blue", "circle", "square", "triangle", "big", "small"]


@pytest.fixture(scope="module")
def acts(tmp_path_factory):
    """A harvest of the tiny pipeline: 40 prompts x 4 steps x 16 tokens = 2560 rows of d = 32."""
    root = tmp_path_factory.mktemp("harvest")
    tiny_flux_pipeline(seed=0).save_pretrained(root / "model")
    prompts = [f"a {WORDS[i % 2 + 4]} {WORDS[i % 3]} {WORDS[3 + i % 3]}" for i in range(40)]
    (root / "prompts.txt").write_text("\n".join(prompts))
    g = TINY_GENERATION
    harvest.main([
        "--model", str(root / "model"), "--prompts", str(root / "prompts.txt"), "--sites", SITE,
        "--out", str(root / "acts"), "--height", str(g["height"]), "--width", str(g["width"]),
        "--num-inference-steps", str(g["num_inference_steps"]), "--max-sequence-length",
        str(g["max_sequence_length"]), "--prompts-per-shard", "4", "--batch-size", "4", "--dtype", "float32",
    ])  # fmt: skip
    return root


def train_args(acts, work, *extra):
    return ["--acts", str(acts / "acts"), "--site", SITE, "--work", str(work), "--n-features", "128",
            "--k", "4", "--batch-size", "64", "--tokens", "19200", "--aux-k", "16", "--held-out", "0.2",
            "--checkpoint-every", "25", "--log-every", "10", *extra]  # fmt: skip


def weights(folder):
    return {k: v.clone() for k, v in TopKSAE.load(folder).state_dict().items()}


def test_training_learns_and_writes_metrics_curves_and_a_loadable_sae(acts, tmp_path):
    train_sae.main(train_args(acts, tmp_path / "work", "--out", str(tmp_path / "dicts")))
    result = json.loads((tmp_path / "work" / "result.json").read_text())
    held = result["held_out"]
    assert held["fvu"] < 0.4, held  # an untrained SAE has FVU ~1 here
    assert held["l0"] <= 4
    rows = [json.loads(x) for x in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "fvu" in r]
    assert train_rows[-1]["fvu"] < train_rows[0]["fvu"] / 2
    assert (tmp_path / "work" / "curves.png").stat().st_size > 10_000

    sae = fluxsae.load_sae(tmp_path / "dicts", site=SITE)
    assert sae.site == SITE and sae.cfg.k == 4 and sae.cfg.mean_token_norm > 0
    assert sae.cfg.base_model == str(acts / "model") and sae.cfg.steps == (0, 1, 2, 3)
    # The saved weights work on raw activations: the held-out figure is reproduced from disk.
    store = ActivationStore(acts / "acts")
    x, _ = store.load(SITE, shards=[8, 9])
    assert reconstruction_metrics(sae, x)["fvu"] == pytest.approx(held["fvu"], rel=1e-4)
    # A site folder itself loads too; a site the folder lacks is named with what it has.
    assert fluxsae.load_sae(tmp_path / "dicts" / SITE, site=SITE).cfg == sae.cfg
    with pytest.raises(DictionaryNotFoundError, match=f"single_transformer_blocks.0.image.*it has: {SITE}"):
        fluxsae.load_sae(tmp_path / "dicts", site="single_transformer_blocks.0.image")


def test_a_partially_whitened_sae_records_its_power_and_learns(acts, tmp_path):
    train_sae.main(train_args(acts, tmp_path / "work", "--out", str(tmp_path / "dicts"),
                              "--normalization", "whiten", "--whiten-power", "0.3"))  # fmt: skip
    held = json.loads((tmp_path / "work" / "result.json").read_text())["held_out"]
    assert held["fvu"] < 0.4, held
    sae = fluxsae.load_sae(tmp_path / "dicts", site=SITE)
    assert sae.cfg.normalization == "whiten" and sae.cfg.whiten_power == 0.3
    x, _ = ActivationStore(acts / "acts").load(SITE, shards=[8, 9])
    assert reconstruction_metrics(sae, x)["fvu"] == pytest.approx(held["fvu"], rel=1e-4)


@pytest.mark.parametrize(
    "scene",
    [[], ["--scene-features", "8"], ["--lr-decay", "0.6"]],
    ids=["tokens", "whole_images", "killed_while_the_lr_decays"],
)
def test_killed_training_resumes_to_the_same_sae(acts, tmp_path, monkeypatch, scene):
    train_sae.main(train_args(acts, tmp_path / "clean", "--out", str(tmp_path / "a"), *scene))
    real_step = train_sae.train_step
    calls = []

    def dying_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 140:  # after the checkpoints at 25..125, mid-epoch
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_sae, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_sae.main(train_args(acts, tmp_path / "resumed", "--out", str(tmp_path / "b"), *scene))
    monkeypatch.setattr(train_sae, "train_step", real_step)
    train_sae.main(train_args(acts, tmp_path / "resumed", "--out", str(tmp_path / "b"), *scene))
    a, b = weights(tmp_path / "a" / SITE), weights(tmp_path / "b" / SITE)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit, match="other settings"):
        train_sae.main(train_args(acts, tmp_path / "resumed", "--k", "8", *scene))


def test_lr_decay_falls_linearly_over_the_last_share_of_steps_to_near_zero(acts, tmp_path):
    train_sae.main(train_args(acts, tmp_path / "constant", "--out", str(tmp_path / "a")))
    train_sae.main(train_args(acts, tmp_path / "decay", "--out", str(tmp_path / "b"), "--lr-decay", "0.5"))
    rows = [json.loads(x) for x in (tmp_path / "decay" / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"] for r in rows if "lr" in r}  # the rate the logged step used
    base = train_sae.default_lr(128)
    # 300 steps: constant for steps 1-150, then 150 steps from base x 150/151 down to base x 1/151.
    assert lr[1] == lr[150] == pytest.approx(base)
    assert lr[200] == pytest.approx(base * 101 / 151) and lr[300] == pytest.approx(base / 151)
    constant = [json.loads(x) for x in (tmp_path / "constant" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["lr"] == pytest.approx(base) for r in constant if "lr" in r)
    # The same batches until step 150, so the runs part only where the rate falls; both learn.
    a, b = weights(tmp_path / "a" / SITE), weights(tmp_path / "b" / SITE)
    assert not torch.equal(a["W_dec"], b["W_dec"])
    held = json.loads((tmp_path / "decay" / "result.json").read_text())["held_out"]
    assert held["fvu"] < 0.4, held
    assert fluxsae.load_sae(tmp_path / "b", site=SITE).cfg.extra["training"]["lr_decay"] == 0.5


@pytest.mark.parametrize(
    ("share", "message"),
    [("-0.1", r"must be a number in \[0, 1\], got -0.1"), ("1.5", r"in \[0, 1\], got 1.5"),
     ("nan", "'nan' is not a finite number")],
)  # fmt: skip
def test_a_bad_lr_decay_is_refused_before_any_work(acts, tmp_path, share, message):
    with pytest.raises(SystemExit, match=f"--lr-decay.*{message}"):
        train_sae.main(train_args(acts, tmp_path / "work", "--lr-decay", share))
    assert not (tmp_path / "work").exists()


def test_two_ddp_processes_match_one_with_the_same_global_batch(acts, tmp_path):
    """Tolerance: each process normalises its FVU by its own half batch, so the averaged gradient
    differs from the one-process gradient by a few per cent; after 300 steps the decoders agree to
    cosine > 0.98 per feature on average and the held-out FVU to within 10%."""
    train_sae.main(train_args(acts, tmp_path / "one", "--out", str(tmp_path / "one_out")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = train_args(acts, tmp_path / "two", "--out", str(tmp_path / "two_out"))
    args[args.index("--batch-size") + 1] = "32"  # per process: the same global batch of 64
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29733",
           "-m", "training.train_sae", *args]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = TopKSAE.load(tmp_path / "one_out" / SITE), TopKSAE.load(tmp_path / "two_out" / SITE)
    cos = torch.nn.functional.cosine_similarity(one.directions, two.directions, dim=-1)
    assert cos.mean() > 0.98, cos.mean()
    r1 = json.loads((tmp_path / "one" / "result.json").read_text())
    r2 = json.loads((tmp_path / "two" / "result.json").read_text())
    assert r1["tokens"] == r2["tokens"]
    assert r2["held_out"]["fvu"] == pytest.approx(r1["held_out"]["fvu"], rel=0.1)


def exact_sae(d: int) -> TopKSAE:
    """A dictionary that reconstructs every vector exactly: features +e_i and -e_i, k = d."""
    sae = TopKSAE(SAEConfig(d_in=d, n_features=2 * d, k=d, site=SITE, normalization="none"))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_spliced_effect_is_one_for_an_exact_dictionary_and_low_for_a_bad_one():
    pipe = tiny_flux_pipeline(seed=0)
    prompts, seeds = ["a red circle", "a blue square"], [3, 4]
    exact = spliced_effect(pipe, exact_sae(32), prompts, seeds, dict(TINY_GENERATION))
    assert exact["velocity_err"] < 1e-8 and exact["image_mse"] < 1e-8
    assert exact["velocity_err_mean_ablation"] > 1e-3
    assert exact["velocity_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert exact["image_recovered"] == pytest.approx(1.0, abs=1e-3)
    # k = 1 keeps one coordinate per token: far worse than exact, so recovered drops well below 1.
    bad = exact_sae(32)
    bad.cfg = dataclasses.replace(bad.cfg, k=1)
    poor = spliced_effect(pipe, bad, prompts, seeds, dict(TINY_GENERATION))
    assert poor["velocity_recovered"] < 0.9
    # The pipeline is left as it was: a plain generation is unchanged.
    g = torch.Generator().manual_seed(3)
    after = pipe(prompts[0], generator=g, output_type="latent", **TINY_GENERATION).images
    fresh = tiny_flux_pipeline(seed=0)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(after, fresh(prompts[0], generator=g, output_type="latent", **TINY_GENERATION).images)


def test_a_dictionary_from_another_model_or_width_is_refused(acts):
    pipe = fluxsae.load_pipeline(acts / "model", device="cpu")
    sae = exact_sae(32)
    sae.cfg = dataclasses.replace(sae.cfg, base_model=str(acts / "model"))
    check_matches_pipeline(sae, pipe)
    other = TopKSAE(
        SAEConfig(d_in=32, n_features=64, k=4, site=SITE, base_model="black-forest-labs/FLUX.1-dev")
    )
    with pytest.raises(DictionaryMismatchError, match="FLUX.1-dev.*load_pipeline"):
        check_matches_pipeline(other, pipe)
    wide = TopKSAE(SAEConfig(d_in=3072, n_features=64, k=4, site=SITE, base_model=str(acts / "model")))
    with pytest.raises(DictionaryMismatchError, match="d_in=3072"):
        check_matches_pipeline(wide, pipe)


def test_an_unreachable_hub_repo_says_what_to_do():
    with pytest.raises(DictionaryNotFoundError, match="HF_HUB_OFFLINE"):
        fluxsae.load_sae("nobody/no-such-saes", site=SITE)


# ----------------------------------------------------------------------------- bounded memory


def in_memory_sample(store, shards, n, seed):
    """The normalisation sample as it was drawn before it streamed: every shard loaded, then sampled."""
    x, _ = store.load(SITE, shards)
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]]


def test_the_normalisation_sample_reads_only_its_rows_and_equals_the_in_memory_one(acts, monkeypatch):
    store = ActivationStore(acts / "acts")
    shards = list(range(8))
    for n in (5, 700, 100_000):  # a few rows per shard, most rows, more than there are
        assert torch.equal(store.sample_rows(SITE, shards, n, seed=3), in_memory_sample(store, shards, n, 3))
    # The SAE built from it is the one the in-memory sample gave, and no shard is loaded whole.
    cfg = train_sae.TrainConfig(
        acts=str(acts / "acts"), site=SITE, n_features=64, k=4, aux_k=16, norm_sample=500
    )
    sample = in_memory_sample(store, shards, 500, cfg.seed)
    monkeypatch.setattr(ActivationStore, "load", lambda *a, **k: pytest.fail("a whole shard was loaded"))
    sae = train_sae.build_sae(cfg, store, shards)
    torch.manual_seed(cfg.seed)
    expected = TopKSAE(dataclasses.replace(sae.cfg))
    expected.fit_normalization(sample, cfg.normalization)
    expected.init_b_dec_from_data(sample)
    assert sae.cfg.mean_token_norm == sample.norm(dim=-1).mean().item()
    assert all(torch.equal(v, expected.state_dict()[k]) for k, v in sae.state_dict().items())


def test_shuffled_batches_are_the_ones_the_whole_window_in_memory_gave(acts):
    """Windows are kept in the storage dtype and gathered per batch; the batches must not change."""
    store = ActivationStore(acts / "acts")

    def in_memory_batches(batch_size, world, rank, shards_in_memory):
        g = torch.Generator().manual_seed(2 * 1_000_003 + 1)  # seed 2, epoch 1
        order = [list(range(8))[i] for i in torch.randperm(8, generator=g).tolist()]
        carry, global_batch = None, batch_size * world
        for start in range(0, 8, shards_in_memory):
            window, _ = store.load(SITE, order[start : start + shards_in_memory])
            window = window[torch.randperm(len(window), generator=g)]
            window = window if carry is None else torch.cat([carry, window])
            n_full = len(window) // global_batch
            for b in range(n_full):
                chunk = window[b * global_batch : (b + 1) * global_batch]
                yield chunk[rank * batch_size : (rank + 1) * batch_size]
            carry = window[n_full * global_batch :]

    for batch_size, world, shards_in_memory in ((64, 1, 8), (50, 2, 3), (700, 1, 1), (300, 2, 2)):
        for rank in range(world):
            old = list(in_memory_batches(batch_size, world, rank, shards_in_memory))
            new = list(store.batches(SITE, batch_size, shards=list(range(8)), seed=2, epoch=1, rank=rank,
                                     world_size=world, shards_in_memory=shards_in_memory))  # fmt: skip
            assert len(new) == len(old) > 0
            assert all(torch.equal(a, b) for a, b in zip(old, new, strict=True))


def image_of_each_row(batch, x, manifest):
    """(prompt, step) and token of each row of `batch`, found by exact match among the rows `x`."""
    where = torch.cdist(batch, x).argmin(dim=1)
    assert torch.equal(x[where], batch)
    return manifest["prompt_id"][where] * 100 + manifest["step"][where], manifest["token"][where]


def test_image_batches_hold_whole_images_in_token_order_each_once_an_epoch(acts):
    store = ActivationStore(acts / "acts")
    assert store.tokens_per_image(SITE) == 16
    shards = list(range(8))  # 32 prompts x 4 steps = 128 images
    x, manifest = store.load(SITE, shards)
    seen = []
    for batch in store.image_batches(SITE, 5, shards=shards, seed=2, epoch=1, shards_in_memory=3):
        image, token = image_of_each_row(batch, x, manifest)
        image, token = image.view(5, 16), token.view(5, 16)
        assert (image == image[:, :1]).all() and (token == token[:, :1] + torch.arange(16)).all()
        seen += image[:, 0].tolist()
    assert len(seen) == len(set(seen)) == 125  # 25 batches of 5; the last 3 images are dropped
    with pytest.raises(ValueError, match="images_per_batch must be >= 1"):
        next(store.image_batches(SITE, 0, shards=shards))
    assert store.steps_per_epoch(SITE, 5 * 16, 1, shards) == 25
    # The images are shuffled across the whole epoch (not shard by shard), and each epoch anew.
    assert seen != sorted(seen)
    epoch_2 = store.image_batches(SITE, 5, shards=shards, seed=2, epoch=2, shards_in_memory=3)
    other = [image_of_each_row(b, x, manifest)[0][0].item() for b in epoch_2]
    assert other != seen[::5]
    # Two ranks split each global batch: together they see what one process with both halves sees.
    one = list(store.image_batches(SITE, 8, shards=shards, seed=0, epoch=0))
    for rank in range(2):
        half = list(store.image_batches(SITE, 4, shards=shards, seed=0, epoch=0, rank=rank, world_size=2))
        assert len(half) == len(one) == 16
        assert all(torch.equal(h, o[rank * 64 : (rank + 1) * 64]) for h, o in zip(half, one, strict=True))


def test_rows_out_of_image_order_are_refused_with_what_to_do(acts, tmp_path):
    """A harvest whose rows were reordered (not by `training.harvest`) cannot give whole images."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = tmp_path / "acts"
    shutil.copytree(acts / "acts", folder)
    path = sorted((folder / "shards").glob("*.safetensors"))[2]
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    swap = torch.arange(len(tensors[f"acts/{SITE}"]))
    swap[[20, 40]] = swap[[40, 20]]  # two rows of different images trade places
    tensors = {k: v[swap] if k == f"acts/{SITE}" or k.startswith("image/") else v for k, v in tensors.items()}
    save_file(tensors, str(path), metadata=meta)
    store = ActivationStore(folder)
    message = f"{path.name}.*whole images of 16 tokens.*training.harvest"
    with pytest.raises(ActivationStoreError, match=message):
        list(store.image_batches(SITE, 4, shards=list(range(8))))


@pytest.fixture(scope="module")
def scene_world(acts, tmp_path_factory):
    """The tiny harvest with a scene added: every image (prompt, step) gets one of three background
    vectors on all its tokens, of 0.7 x the mean token norm. Returns (folder, background of a row)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    def background(manifest):
        return (manifest["prompt_id"] + manifest["step"].long()) % 3

    root = tmp_path_factory.mktemp("scene_world")
    shutil.copytree(acts / "acts", root / "acts")
    x, _ = ActivationStore(acts / "acts").load(SITE)
    vectors = torch.randn(3, x.shape[1], generator=torch.Generator().manual_seed(0))
    vectors *= 0.7 * x.norm(dim=1).mean() / vectors.norm(dim=1, keepdim=True)
    for path in sorted((root / "acts" / "shards").glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        rows = {k.split("/")[1]: v for k, v in tensors.items() if k.startswith("image/")}
        tensors[f"acts/{SITE}"] += vectors[background(rows)]
        save_file(tensors, str(path), metadata=meta)
    return root, background


def scene_figures(folder, world, features=range(8)) -> tuple[float, float]:
    """On the held-out images: (within-image / total variance of `features`, the worst over the three
    backgrounds of the best of `features` at detecting it, as AUROC over tokens)."""
    root, background = world
    sae = TopKSAE.load(folder / SITE)
    x, manifest = ActivationStore(root / "acts").load(SITE, shards=[8, 9])  # 32 whole images, in order
    with torch.no_grad():
        out = sae(x)
    codes = torch.zeros(len(x), sae.cfg.n_features).scatter_add_(1, out.indices, out.values)
    codes = codes[:, list(features)]
    labels = torch.stack([background(manifest) == b for b in range(3)], dim=1)
    best = auroc(codes, labels).nan_to_num(0.5).max(dim=0).values
    return scene_consistency(out, 16, features).item(), best.min().item()


def test_scene_features_detect_the_background_of_each_image_and_reconstruction_is_kept(scene_world, tmp_path):
    root, _ = scene_world
    train_sae.main(train_args(root, tmp_path / "plain", "--out", str(tmp_path / "plain_out")))
    scene = ["--scene-features", "8", "--scene-weight", "1"]
    train_sae.main(train_args(root, tmp_path / "scene", "--out", str(tmp_path / "scene_out"), *scene))
    plain_share, plain_auroc = scene_figures(tmp_path / "plain_out", scene_world)
    scene_share, scene_auroc = scene_figures(tmp_path / "scene_out", scene_world)
    # Without the term, features 0-7 are whatever training made them; with it, they are the scene's.
    assert scene_auroc > 0.9 and plain_auroc < scene_auroc - 0.1, (plain_auroc, scene_auroc)
    assert scene_share < plain_share
    plain_fvu, scene_fvu = (json.loads((tmp_path / w / "result.json").read_text())["held_out"]["fvu"]
                            for w in ("plain", "scene"))  # fmt: skip
    assert scene_fvu < 1.1 * plain_fvu
    sae = fluxsae.load_sae(tmp_path / "scene_out", site=SITE)
    assert sae.cfg.extra["training"]["scene_features"] == 8
    rows = [json.loads(x) for x in (tmp_path / "scene" / "metrics.jsonl").read_text().splitlines()]
    assert all("extra_loss" in r for r in rows if "fvu" in r)


def scene_codes_output(codes: torch.Tensor) -> ForwardOutput:
    """A ForwardOutput whose sparse code holds every column of `codes` [tokens, width]."""
    idx = torch.arange(codes.shape[1]).expand_as(codes)
    return ForwardOutput(codes, codes, idx, codes.new_zeros(()), codes.new_zeros(()))


def test_scene_decorrelation_is_one_for_copies_and_zero_for_features_of_different_scenes():
    scene = torch.tensor([1.0, 0, 2, 0, 1, 3]).repeat_interleave(4)  # 6 images of 4 tokens
    other = (scene == 0).float()  # fires exactly where the first is silent
    copies = scene_codes_output(torch.stack([scene, 2 * scene], dim=1))
    apart = scene_codes_output(torch.stack([scene, other], dim=1))
    assert scene_decorrelation(copies, 4, range(2)).item() == pytest.approx(1.0, abs=1e-5)
    assert scene_decorrelation(apart, 4, range(2)).item() == 0.0
    # only the chosen features count: a copy outside them changes nothing
    three = scene_codes_output(torch.stack([scene, other, scene], dim=1))
    assert scene_decorrelation(three, 4, range(2)).item() == 0.0
    assert scene_decorrelation(three, 4, range(3)).item() == pytest.approx(1 / 3, abs=1e-5)
    # its gradient reaches the activations: a small step down it makes two correlated features less so
    values = torch.stack([scene, scene + torch.rand(24, generator=torch.Generator().manual_seed(0))], dim=1)
    values.requires_grad_(True)
    before = scene_decorrelation(scene_codes_output(values), 4, range(2))
    before.backward()
    with torch.no_grad():
        after = scene_decorrelation(scene_codes_output(values - 0.5 * values.grad), 4, range(2))
    assert 0 < after < before


def test_scene_overlap_is_one_for_copies_zero_for_disjoint_scenes_and_counts_a_shared_middle():
    scene = torch.tensor([1.0, 0, 2, 0, 1, 3]).repeat_interleave(4)  # 6 images of 4 tokens
    other = (scene == 0).float()
    copies = scene_codes_output(torch.stack([scene, 2 * scene], dim=1))
    apart = scene_codes_output(torch.stack([scene, other], dim=1))
    assert scene_overlap(copies, 4, range(2)).item() == pytest.approx(1.0, abs=1e-5)
    assert scene_overlap(apart, 4, range(2)).item() == 0.0
    three = scene_codes_output(torch.stack([scene, other, scene], dim=1))
    assert scene_overlap(three, 4, range(2)).item() == 0.0
    assert scene_overlap(three, 4, range(3)).item() == pytest.approx(1 / 3, abs=1e-5)
    # a brightness ramp read by two features (dark: black 2, gray 1, white 0; light: the reverse):
    # anti-correlated, so decorrelation is satisfied, but both fire on gray scenes, which overlap sees
    dark = torch.tensor([2.0, 1, 0, 2, 1, 0]).repeat_interleave(4)
    ramp = scene_codes_output(torch.stack([dark, 2 - dark], dim=1))
    assert scene_decorrelation(ramp, 4, range(2)).item() == 0.0
    assert scene_overlap(ramp, 4, range(2)).item() == pytest.approx(0.04, abs=1e-4)  # cos 1/5
    values = torch.stack([dark, 2 - dark], dim=1).requires_grad_(True)
    before = scene_overlap(scene_codes_output(values), 4, range(2))
    before.backward()
    with torch.no_grad():
        after = scene_overlap(scene_codes_output((values - 0.5 * values.grad).clamp_min(0)), 4, range(2))
    assert 0 <= after < before


@pytest.mark.parametrize("term", ["--scene-decorrelation", "--scene-overlap"])
def test_scene_features_kept_apart_still_detect_the_scene(scene_world, tmp_path, term):
    scene = ["--scene-features", "8", "--scene-weight", "1", term, "1"]
    train_sae.main(train_args(scene_world[0], tmp_path / "work", "--out", str(tmp_path / "out"), *scene))
    _, auroc = scene_figures(tmp_path / "out", scene_world)
    assert auroc > 0.9
    sae = fluxsae.load_sae(tmp_path / "out", site=SITE)
    assert sae.cfg.extra["training"][term[2:].replace("-", "_")] == 1.0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--scene-features", "8", "--batch-size", "72"], "not a multiple of the 16 tokens.*use e.g. 64"),
        (["--scene-features", "8", "--scene-offset", "124"], "must lie among the 128 features"),
        (["--scene-features", "8", "--scene-weight", "-1"], "--scene-weight must be a number >= 0, got -1.0"),
        (["--scene-features", "8", "--scene-decorrelation", "-1"], "--scene-decorrelation must be a number"),
        (["--scene-decorrelation", "1"], "in pairs: use --scene-features 2 or more"),
        (["--scene-features", "8", "--scene-overlap", "-1"], "--scene-overlap must be a number >= 0"),
        (["--scene-features", "1", "--scene-overlap", "1"], "in pairs: use --scene-features 2 or more"),
    ],
)
def test_bad_scene_settings_are_refused_before_any_work(acts, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        train_sae.main(train_args(acts, tmp_path / "work", *extra))
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--matryoshka", "16,64", "--matryoshka-weights", "1"], r"width \(16,64\), got 1\."),
        (["--matryoshka", "16", "--matryoshka-weights", "-1"], "--matryoshka-weights must be a number >= 0"),
        (["--matryoshka-weights", "1"], r"per --matryoshka width \(none given\)"),
    ],
)
def test_bad_matryoshka_weights_are_refused_before_any_work(acts, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        train_sae.main(train_args(acts, tmp_path / "work", *extra))
    assert not (tmp_path / "work").exists()


def dense_metrics(dictionary, x):
    """The formulas of fluxsae.evaluate on dense codes, all of x in memory at once: the oracle."""
    codes = dictionary.encode(x)
    x_hat = dictionary.decode(codes).float()
    fvu = ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    xc, hc = x - x.mean(0), x_hat - x_hat.mean(0)
    corr = (xc * hc).sum(0) / (xc.norm(dim=0) * hc.norm(dim=0)).clamp_min(1e-12)
    fired = (codes != 0).sum(0)
    density = fired.float() / len(x)
    return {
        "fvu": fvu, "explained_variance": 1 - fvu, "r2_mean_dim": corr.pow(2).mean().item(),
        "l0": (codes != 0).sum().item() / len(x), "dead_fraction": (fired == 0).float().mean().item(),
        "density_median": density.median().item(), "density_max": density.max().item(), "n_tokens": len(x),
    }  # fmt: skip


def test_streamed_sparse_metrics_equal_the_dense_formulas(acts):
    from fluxsae.evaluate import density_histogram
    from fluxsae.itda_build import build_itda

    store = ActivationStore(acts / "acts")
    x, _ = store.load(SITE, shards=[8, 9])
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=32, n_features=128, k=4, site=SITE, normalization="none"))
    train_x, _ = store.load(SITE, shards=range(8))
    sae.init_b_dec_from_data(train_x)
    itda = build_itda(train_x.split(256), d_in=32, k=4, threshold=0.2, max_atoms=60)
    assert 0 < itda.n_atoms <= 60
    for dictionary in (sae, itda):
        expected = dense_metrics(dictionary, x)
        for streamed in (
            reconstruction_metrics(dictionary, x, batch_size=100),  # a tensor, in batches
            reconstruction_metrics(dictionary, store.iter_rows(SITE, [8, 9], batch_size=77)),  # a stream
        ):
            assert streamed.keys() == expected.keys()
            for key, value in expected.items():
                assert streamed[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (type(dictionary), key)
        counts, edges = density_histogram(dictionary, store.iter_rows(SITE, [8, 9], batch_size=50), bins=10)
        density = (dictionary.encode(x) != 0).float().mean(0).numpy()
        assert counts.sum() == (density > 0).sum()
        assert edges[0] == pytest.approx(np.log10(density[density > 0]).min(), rel=1e-5)
    with pytest.raises(ValueError, match="no tokens"):
        reconstruction_metrics(sae, iter([]))


def test_every_setting_has_help_and_none_turns_an_optional_setting_off(capsys):
    commands = {
        train_sae.main: (train_sae.TrainConfig, "Training tokens drawn at random"),
        build_cmd.main: (build_cmd.BuildConfig, "Stop adding atoms at this many"),
        shapes_model.main: (shapes_model.ShapesModelConfig, "Images per VAE step"),
        harvest.main: (harvest.HarvestConfig, "Prompt i is generated with seed"),
    }
    for main, (cls, doc) in commands.items():
        assert set(field_docs(cls)) == {f.name for f in dataclasses.fields(cls)}, cls  # each has a docstring
        with pytest.raises(SystemExit) as done:
            main(["--help"])
        assert done.value.code == 0
        assert doc in " ".join(capsys.readouterr().out.split()), cls
    p = argparse.ArgumentParser()
    add_config_arguments(p, train_sae.TrainConfig)
    required = ["--acts", "h", "--site", SITE]
    assert config_from_args(train_sae.TrainConfig, p.parse_args(required)).lr is None
    assert config_from_args(train_sae.TrainConfig, p.parse_args([*required, "--lr", "1e-3"])).lr == 1e-3
    assert config_from_args(train_sae.TrainConfig, p.parse_args([*required, "--lr", "None"])).lr is None
    with pytest.raises(SystemExit):
        p.parse_args([*required, "--lr", "fast"])
    assert "'fast' is not a float or 'none'" in capsys.readouterr().err


def test_a_work_folder_of_an_older_version_resumes_and_other_settings_are_refused(tmp_path):
    cfg = train_sae.TrainConfig(acts="h", site=SITE)
    legacy = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "shards_in_memory"}
    (tmp_path / "train_config.json").write_text(json.dumps({**legacy, "lr": 0.0}))  # 0 meant "automatic"
    claim(tmp_path, "train_config.json", cfg)
    assert json.loads((tmp_path / "train_config.json").read_text())["lr"] is None
    with pytest.raises(SystemExit, match=r"other settings \(k, lr differ from .*train_config.json\)"):
        claim(tmp_path, "train_config.json", dataclasses.replace(cfg, k=8, lr=1e-3))


# ----------------------------------------------------------------------------- nothing lost, nothing wrong


def short_args(acts, work, *extra):
    """A 20-step run of the tiny harvest: enough to export an SAE."""
    args = train_args(acts, work, *extra)
    args[args.index("--tokens") + 1] = "1280"
    return args


def test_a_torn_metrics_line_left_by_a_full_disk_does_not_block_the_rerun(acts, tmp_path, monkeypatch):
    work, out = tmp_path / "work", tmp_path / "out"
    calls = []
    real_step = train_sae.train_step

    def dying_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 15:  # after the checkpoint at step 10 was written and rows were logged
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    args = short_args(acts, work, "--checkpoint-every", "10", "--log-every", "2", "--out", str(out))
    monkeypatch.setattr(train_sae, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_sae.main(args)
    monkeypatch.setattr(train_sae, "train_step", real_step)
    metrics = work / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes()[:-30])  # the last row cut short, as a full disk leaves it
    train_sae.main(args)
    assert fluxsae.load_sae(out, site=SITE).cfg.extra["training"]["tokens"] == 1280
    assert (work / "curves.png").is_file()
    lines = metrics.read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # the torn row was cut off before the rerun appended
    assert json.loads(lines[-1])["eval_fvu"] > 0


def test_a_log_row_that_cannot_be_written_leaves_no_half_row_and_a_bad_one_is_named(tmp_path, monkeypatch):
    import errno

    from training import work as work_module

    log = tmp_path / "metrics.jsonl"
    work_module.append_jsonl(log, {"step": 1})
    real_write = os.write

    def full_disk(fd, data):
        real_write(fd, data[:7])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(work_module.os, "write", full_disk)
    with pytest.raises(OSError, match=f"could not append a row to {log}"):
        work_module.append_jsonl(log, {"step": 2, "fvu": 0.5})
    monkeypatch.undo()
    assert log.read_text() == '{"step": 1}\n'
    log.write_text('{"step": 1}\n{"step": 2, "f\n{"step": 3}\n')  # a damaged row in the middle
    with pytest.raises(ValueError, match=f"{log}, line 2: not a JSON row"):
        work_module.read_jsonl(log)


def test_out_is_never_replaced_by_another_run_unless_asked(acts, tmp_path):
    out = tmp_path / "out"
    train_sae.main(short_args(acts, tmp_path / "a", "--out", str(out)))
    before = weights(out / SITE)
    with pytest.raises(SystemExit, match=r"already holds another 'topk' dictionary \(n_features 128, k 4\), "
                                         r"made with other settings \(k differ\).*--overwrite"):  # fmt: skip
        train_sae.main(short_args(acts, tmp_path / "b", "--out", str(out), "--k", "2"))
    assert not (tmp_path / "b").exists()  # refused before any work
    assert all(torch.equal(v, before[k]) for k, v in weights(out / SITE).items())
    train_sae.main(short_args(acts, tmp_path / "a", "--out", str(out)))  # the same run again: allowed
    train_sae.main(short_args(acts, tmp_path / "b", "--out", str(out), "--k", "2", "--overwrite"))
    assert fluxsae.load_sae(out, site=SITE).cfg.k == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tokens", "0"], "--tokens must be an integer >= 1, got 0"),
        (["--tokens=-1"], "--tokens must be an integer >= 1, got -1"),
        (["--tokens", "10"], "--tokens 10 is less than one step's batch of 64 tokens.*nothing would be"),
        (["--batch-size=-1"], "--batch-size must be an integer >= 1, got -1"),
        (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
        (["--lr", "inf"], "--lr: 'inf' is not a finite number"),
        (["--lr", "100"], r"--lr must be a number in \(0, 1\], got 100.0"),
        (["--checkpoint-every", "0"], "--checkpoint-every must be an integer >= 1, got 0"),
        (["--log-every", "0"], "--log-every must be an integer >= 1, got 0"),
        (["--shards-in-memory", "0"], "--shards-in-memory must be an integer >= 1, got 0"),
        (["--n-features", "1e9"], "--n-features: '1e9' is not an int"),
        (["--n-features", str(10**9)], "Training 1000000000 features on d_in=32 needs about .* of memory"),
        (["--n-features", "64", "--aux-k", "256"], "--aux-k 256 .* exceeds --n-features 64.*--aux-k 32"),
        (["--k", "200"], "--k 200 exceeds --n-features 128"),
        (["--held-out=-1"], r"--held-out must be a number in \[0, 1\), got -1.0"),
        (["--matryoshka", "64,16"], "--matryoshka 64,16: the prefix widths must increase"),
        (["--threads=-1"], "--threads must be an integer >= 1"),
        (["--device", "cuda:7"], "--device cuda:7: this machine has"),
    ],
)
def test_settings_that_cannot_work_are_refused_before_any_work(acts, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        train_sae.main(train_args(acts, tmp_path / "work", "--out", str(tmp_path / "out"), *extra))
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


def test_a_run_that_diverges_is_stopped_and_exports_nothing(acts, tmp_path):
    with pytest.raises(SystemExit, match=r"(diverged|worse than predicting every token by the mean).*--lr"):
        train_sae.main(short_args(acts, tmp_path / "work", "--out", str(tmp_path / "out"), "--lr", "1"))
    assert not (tmp_path / "out").exists()


def test_sae_and_itda_work_folders_are_told_apart(acts, tmp_path):
    train_sae.main(short_args(acts, tmp_path / "sae_work"))
    with pytest.raises(SystemExit, match="is the folder of an SAE training run.*Pass another --work"):
        build_cmd.main(["--acts", str(acts / "acts"), "--site", SITE, "--work", str(tmp_path / "sae_work")])
    assert (tmp_path / "sae_work" / "checkpoint.safetensors").is_file()
    itda_work = tmp_path / "itda_work"
    build_cmd.main(["--acts", str(acts / "acts"), "--site", SITE, "--work", str(itda_work), "--k", "4",
                    "--batch-size", "256"])  # fmt: skip
    with pytest.raises(SystemExit, match="is the folder of an ITDA build"):
        train_sae.main(short_args(acts, itda_work))
    # A checkpoint of the other kind, without its settings file, is named too (no raw RuntimeError).
    (itda_work / "build_config.json").unlink()
    with pytest.raises(SystemExit, match="checkpoint.safetensors is not a checkpoint of this SAE training"):
        train_sae.main(short_args(acts, itda_work))
