"""The FLUX.1 recipe end to end on a random-weight FLUX.1 at reduced depth and width (real diffusers
pipeline, real files, an HTTP judge on 127.0.0.1), its resumption, and its refusal of a disk too small."""

import json
import re

import pytest
import torch

import fluxsae
from fluxsae.activations import ActivationStore
from fluxsae.autointerp.loopback import LoopbackChat, answer
from training import flux_recipe

# FLUX.1-schnell's configs with fewer blocks and narrower layers (d 64 instead of 3072).
SMALL = (
    "transformer.num_layers=1 transformer.num_single_layers=1 transformer.num_attention_heads=2 "
    "transformer.attention_head_dim=32 transformer.axes_dims_rope=[8,12,12] "
    "text_encoder.num_hidden_layers=1 text_encoder.hidden_size=32 text_encoder.intermediate_size=64 "
    "text_encoder.projection_dim=32 text_encoder.num_attention_heads=2 text_encoder.vocab_size=512 "
    "text_encoder_2.num_layers=1 text_encoder_2.d_model=32 text_encoder_2.d_ff=64 text_encoder_2.num_heads=2 "
    "text_encoder_2.d_kv=16 text_encoder_2.vocab_size=512 "
    "vae.block_out_channels=[8,8,16,16] vae.layers_per_block=1 vae.norm_num_groups=4 vae.latent_channels=4"
)
SITES = "transformer_blocks.0.image,single_transformer_blocks.0.image"
PROMPTS = [
    "a red circle on a blue background",
    "the green square at the top",
    "a small yellow triangle",
    "large red square in the middle",
    "a cat on a dog",
    "photo of a blue circle",
    "an orange square",
    "the purple triangle on white",
    "a small green circle",
    "a red triangle at the bottom",
    "a blue cat",
    "a large green dog",
    "the yellow square on black",
    "a photo of an orange circle",
]


def recipe_args(work, prompts, *extra):
    return [
        "--work",
        str(work),
        "--random-weights",
        "--random-set",
        SMALL,
        "--device",
        "cpu",
        "--prompts",
        str(prompts),
        "--n-prompts",
        "6",
        "--sites",
        SITES,
        "--steps",
        "0,1",
        "--height",
        "64",
        "--width",
        "64",
        "--num-inference-steps",
        "2",
        "--max-sequence-length",
        "16",
        "--dtype",
        "float32",
        "--batch-size",
        "3",
        "--prompts-per-shard",
        "3",
        "--n-features",
        "32",
        "--k",
        "4",
        "--aux-k",
        "8",
        "--sae-tokens",
        "256",
        "--sae-batch-size",
        "64",
        "--itda-k",
        "4",
        "--itda-max-atoms",
        "16",
        "--itda-threshold",
        "0.3",
        "--label-prompts",
        "8",
        "--label-methods",
        "sae,itda",
        "--max-units",
        "3",
        "--label-workers",
        "2",
        "--explainer",
        "http",
        "--dry-run",
        *extra,
    ]


def judge(body, n):
    text = " ".join(p.get("text", "") for m in body["messages"] for p in m["content"] if isinstance(p, dict))
    return answer("PATTERN: red things") if "PATTERN" in text else answer("SCORE: 0.75")


def test_recipe_runs_end_to_end_and_a_rerun_skips_every_stage(tmp_path, monkeypatch, capsys):
    import datasets

    # datasets caches a local folder's parquet by the folder's name and its card's configs, not by its
    # files: a folder of the same name from an earlier run would be read back instead of this one.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    work = tmp_path / "run"
    with LoopbackChat(judge) as server:
        monkeypatch.setenv("FLUXSAE_AUTOINTERP_URL", server.url)
        monkeypatch.setenv("FLUXSAE_AUTOINTERP_MODEL", "scripted")
        flux_recipe.main(recipe_args(work, prompts))
        asked = len(server.requests)
    out = capsys.readouterr().out
    # The estimate came first, with the harvest's exact size: 6 prompts x 2 steps x 16 tokens x d 64 x 4 B
    # per site, plus 36 B of manifest per row of the one image stream.
    estimate = json.loads((work / "recipe" / "estimate.json").read_text())
    rows = 6 * 2 * 16
    assert estimate["harvest"]["tokens"] == 2 * rows
    assert estimate["harvest"]["disk_bytes"] == 2 * rows * 64 * 4 + rows * 36
    assert out.index("time (rough)") < out.index("== harvest:")

    # The random model is a real FLUX.1-schnell pipeline folder (the configs, reduced), loadable as any other.
    pipe = fluxsae.load_pipeline(work / "model", device="cpu")
    assert type(pipe).__name__ == "FluxPipeline"
    assert pipe.transformer.inner_dim == 64 and len(pipe.transformer.transformer_blocks) == 1
    assert pipe.scheduler.config.shift == 1.0 and not pipe.scheduler.config.use_dynamic_shifting
    assert pipe.vae_scale_factor == 8 and pipe.tokenizer_2.model_max_length == 512

    store = ActivationStore(work / "harvest")
    for site in SITES.split(","):
        assert store.n_rows(site) == rows
    assert store.config["steps"] == [0, 1] and store.config["generation"]["height"] == 64
    # The label harvest holds the prompts after the training ones, with other noise seeds.
    labels_store = ActivationStore(work / "labels_harvest")
    assert [p["prompt"] for p in labels_store.prompts()] == PROMPTS[6:14]
    assert labels_store.prompts()[0]["seed"] != store.prompts()[0]["seed"]

    # Published (staged) repos load through the public API.
    for site in SITES.split(","):
        sae = fluxsae.load_sae(work / "publish" / "sae", site=site)
        assert (sae.cfg.d_in, sae.cfg.n_features, sae.cfg.k) == (64, 32, 4)
        assert sae.cfg.base_model == str(work / "model") and sae.cfg.steps == (0, 1)
        itda = fluxsae.load_itda(work / "publish" / "itda", site=site)
        assert 0 < itda.n_atoms <= 16 and itda.cfg.k == 4
        x = store.load(site, [0])[0].float()
        assert torch.isfinite(sae(x).x_hat).all()
    root = json.loads((work / "publish" / "sae" / "config.json").read_text())
    assert root["command"] == "python -m training.flux_recipe" and root["settings"]["n_features"] == 32
    for method in ("sae", "itda"):
        labels = fluxsae.load_labels(work / "publish" / f"labels-{method}")
        assert set(labels["method"]) == {method} and len(labels) == 2 * 3  # 3 units of each of 2 sites
        assert set(labels["label"]) == {"red things"}
        # judged on 5 positives (0.75 each) and the top images of the 2 other units (1 - 0.75)
        assert list(labels["score"]) == [pytest.approx((5 * 0.75 + 2 * 0.25) / 7)] * 6

    # A rerun of the same command skips every stage and changes no file.
    # (recipe.json and recipe/estimate.json are rewritten: the settings claim and the new estimate)
    stamps = {
        p: p.stat().st_mtime_ns
        for p in work.rglob("*")
        if p.is_file() and "recipe" not in p.parts and p.name != "recipe.json"
    }
    with LoopbackChat(judge) as server:
        monkeypatch.setenv("FLUXSAE_AUTOINTERP_URL", server.url)
        flux_recipe.main(recipe_args(work, prompts))
        assert not server.requests
    out = capsys.readouterr().out
    assert "== harvest: done" in out and "python -m training.harvest" not in out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert asked > 0

    # A stage whose marker is gone runs again and resumes from its own checkpoint (train_sae: its last step).
    site = SITES.split(",")[0]
    metrics = work / "sae_work" / site / "metrics.jsonl"
    trained = [json.loads(line) for line in metrics.read_text().splitlines() if '"fvu"' in line]
    (work / "recipe" / f"sae-{site}.done.json").unlink()
    flux_recipe.main(recipe_args(work, prompts))
    out = capsys.readouterr().out
    assert "python -m training.train_sae" in out and "python -m training.harvest" not in out
    again = [json.loads(line) for line in metrics.read_text().splitlines() if '"fvu"' in line]
    assert again == trained  # resumed at its last checkpoint: no step was trained twice
    assert json.loads((work / "sae_work" / site / "result.json").read_text())["steps"] == 256 // 64

    # Other settings in the same folder are refused rather than mixed.
    with pytest.raises(SystemExit, match="other settings"):
        flux_recipe.main(recipe_args(work, prompts, "--k", "8"))


def test_a_disk_too_small_for_the_harvest_is_refused_before_anything_is_written(tmp_path, capsys):
    work = tmp_path / "run"
    # 10^10 prompts x 1 step x 256 tokens x 3072 x 2 B: 15.7 PB for one site of full-size FLUX.1-schnell.
    args = [
        "--work",
        str(work),
        "--random-weights",
        "--device",
        "cpu",
        "--dataset",
        "nobody/captions",
        "--n-prompts",
        str(10**10),
        "--explainer",
        "none",
    ]
    with pytest.raises(SystemExit) as err:
        flux_recipe.main(args)
    message = str(err.value)
    harvest_pb = float(re.search(r"the harvest ([\d.]+) PB", message).group(1))
    assert harvest_pb == pytest.approx((10**10 * 256 * 3072 * 2 + 10**10 * 256 * 36) / 1e15, abs=0.05)
    assert re.search(r"has [\d.]+ [KMGT]?B free", message), message
    assert "--n-prompts" in message and "--work" in message and "--dtype" in message
    table = capsys.readouterr().out
    harvest_row = next(line for line in table.splitlines() if line.startswith("harvest"))
    assert f"{10**10 * 256:,}" in harvest_row  # tokens, before any byte was written
    assert not work.exists()
