"""Training SAEs on harvested activations: it learns, it resumes where it was killed, two DDP
processes agree with one, and the result loads back with `load_sae` and works spliced into a pipeline."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fluxsae
from fluxsae.activations import ActivationStore
from fluxsae.evaluate import reconstruction_metrics, spliced_effect
from fluxsae.hub import DictionaryMismatchError, DictionaryNotFoundError, check_matches_pipeline
from fluxsae.sae import SAEConfig, TopKSAE
from fluxsae.testing import TINY_GENERATION, tiny_flux_pipeline
from training import harvest, train_sae

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


def test_killed_training_resumes_to_the_same_sae(acts, tmp_path, monkeypatch):
    train_sae.main(train_args(acts, tmp_path / "clean", "--out", str(tmp_path / "a")))
    real_step = train_sae.train_step
    calls = []

    def dying_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 140:  # after the checkpoints at 25..125, mid-epoch
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_sae, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_sae.main(train_args(acts, tmp_path / "resumed", "--out", str(tmp_path / "b")))
    monkeypatch.setattr(train_sae, "train_step", real_step)
    train_sae.main(train_args(acts, tmp_path / "resumed", "--out", str(tmp_path / "b")))
    a, b = weights(tmp_path / "a" / SITE), weights(tmp_path / "b" / SITE)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit, match="other settings"):
        train_sae.main(train_args(acts, tmp_path / "resumed", "--k", "8"))


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
