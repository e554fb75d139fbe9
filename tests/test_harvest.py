"""Harvesting activations to shards: what is stored is what the model computed, and nothing is lost
or duplicated when a harvest is killed and run again."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fluxsae import capture
from fluxsae.activations import ActivationStore, ActivationStoreError
from fluxsae.fileio import load_tensors
from fluxsae.tiny import TINY_GENERATION, tiny_flux_pipeline
from training import harvest

SITES = "transformer_blocks.1.image,single_transformer_blocks.0.text"
PROMPTS = ["a red circle", "a blue square", "the green triangle", "a red square", "a big red circle",
           "blue", "a small blue circle", "green square"]  # fmt: skip
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_model")
    tiny_flux_pipeline(seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n")
    return path


def harvest_args(model_dir, prompt_file, out, *extra):
    g = TINY_GENERATION
    return [
        "--model", str(model_dir), "--prompts", str(prompt_file), "--sites", SITES, "--out", str(out),
        "--height", str(g["height"]), "--width", str(g["width"]), "--num-inference-steps",
        str(g["num_inference_steps"]), "--max-sequence-length", str(g["max_sequence_length"]),
        "--prompts-per-shard", "3", "--batch-size", "2", "--dtype", "float32", *extra,
    ]  # fmt: skip


def shard_contents(folder: Path) -> dict[str, tuple]:
    """name -> (tensors, metadata) of every shard (bytes differ: safetensors orders its header freely)."""
    return {p.name: load_tensors(p) for p in sorted((folder / "shards").glob("shard-*.safetensors"))}


def assert_same_shards(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        (ta, ma), (tb, mb) = a[name], b[name]
        assert ma == mb and list(ta) == list(tb)
        assert all(torch.equal(ta[k], tb[k]) for k in ta), name


def test_rows_are_what_capture_sees_with_their_manifest(model_dir, prompt_file, tmp_path):
    harvest.main(harvest_args(model_dir, prompt_file, tmp_path / "h", "--seed", "100"))
    store = ActivationStore(tmp_path / "h")
    assert len(store.shards) == 3  # 8 prompts, 3 per shard
    acts, manifest = store.load("transformer_blocks.1.image")
    text, text_manifest = store.load("single_transformer_blocks.0.text")
    n_p, steps, tokens = len(PROMPTS), TINY_GENERATION["num_inference_steps"], 16  # 32 px -> 4 x 4 tokens
    n_text = TINY_GENERATION["max_sequence_length"]  # 12 T5 tokens
    assert acts.shape == (n_p * steps * tokens, 32)
    assert store.n_rows("transformer_blocks.1.image") == len(acts)
    assert text.shape == (n_p * steps * n_text, 32)

    # Every prompt generated again by hand, alone, with its recorded seed: row r of the harvest is
    # prompt r // (steps x tokens), then step, then token, exactly as capture saw them.
    pipe = tiny_flux_pipeline(seed=0)
    seeds = manifest["seed"].view(n_p, steps * tokens)
    assert seeds.unique(dim=1).flatten().tolist() == [100 + i for i in range(n_p)]
    expected = {"transformer_blocks.1.image": [], "single_transformer_blocks.0.text": []}
    for i, prompt in enumerate(PROMPTS):
        with capture(pipe, list(expected)) as cap:
            pipe(prompt, generator=torch.Generator().manual_seed(100 + i), output_type="latent",
                 **TINY_GENERATION)  # fmt: skip
        for site in expected:
            expected[site].append(cap[site][:, 0])  # [steps, tokens, d]
    torch.testing.assert_close(
        acts.view(n_p, steps, tokens, -1), torch.stack(expected["transformer_blocks.1.image"]),
        rtol=1e-4, atol=1e-5,
    )  # fmt: skip
    torch.testing.assert_close(
        text.view(n_p, steps, n_text, -1), torch.stack(expected["single_transformer_blocks.0.text"]),
        rtol=1e-4, atol=1e-5,
    )  # fmt: skip

    # The manifest says where each row comes from, in the same (prompt, step, token) order.
    def grid(values, dim, n):
        view = [1, 1, 1]
        view[dim] = -1
        return torch.as_tensor(values).view(view).expand(n_p, steps, n).flatten().tolist()

    assert manifest["prompt_id"].tolist() == grid(range(n_p), 0, tokens)
    assert manifest["step"].tolist() == grid(range(steps), 1, tokens)
    assert manifest["token"].tolist() == grid(range(tokens), 2, tokens)
    assert manifest["row"].tolist() == grid([t // 4 for t in range(tokens)], 2, tokens)
    assert manifest["col"].tolist() == grid([t % 4 for t in range(tokens)], 2, tokens)
    assert torch.allclose(manifest["timestep"], torch.tensor(grid(cap.sigmas.tolist(), 1, tokens)))
    assert text_manifest["prompt_id"].tolist() == grid(range(n_p), 0, n_text)
    assert text_manifest["step"].tolist() == grid(range(steps), 1, n_text)
    assert text_manifest["token"].tolist() == grid(range(n_text), 2, n_text)
    # Text-stream rows have no image cell.
    assert set(text_manifest["row"].tolist()) == set(text_manifest["col"].tolist()) == {-1}
    prompts = store.prompts()
    assert [p["prompt"] for p in prompts] == PROMPTS and prompts[4]["seed"] == 104
    manifest_json = json.loads((tmp_path / "h" / "manifest.json").read_text())
    assert manifest_json["rows"]["image"] == len(acts)


def test_killed_harvest_resumes_without_losing_or_duplicating_a_shard(
    model_dir, prompt_file, tmp_path, monkeypatch
):
    harvest.main(harvest_args(model_dir, prompt_file, tmp_path / "clean"))
    clean = shard_contents(tmp_path / "clean")

    # Die while writing the second shard, leaving a torn temporary file as a SIGKILL would.
    real_write = harvest.write_shard
    calls = []

    def dying_write(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            (path.parent / f".{path.name}.tmp-killed").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(harvest, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        harvest.main(harvest_args(model_dir, prompt_file, tmp_path / "resumed"))
    assert list(shard_contents(tmp_path / "resumed")) == ["shard-000000.safetensors"]
    monkeypatch.setattr(harvest, "write_shard", real_write)

    harvest.main(harvest_args(model_dir, prompt_file, tmp_path / "resumed"))
    assert_same_shards(shard_contents(tmp_path / "resumed"), clean)  # none lost, none twice, bit-exact
    assert not list((tmp_path / "resumed" / "shards").glob(".*"))  # the torn file is gone
    _, manifest = ActivationStore(tmp_path / "resumed").load("transformer_blocks.1.image")
    assert sorted(set(manifest["prompt_id"].tolist())) == list(range(len(PROMPTS)))


def test_torchrun_splits_prompts_by_rank_and_matches_one_process(model_dir, prompt_file, tmp_path):
    harvest.main(harvest_args(model_dir, prompt_file, tmp_path / "one"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29731",
           "-m", "training.harvest", *harvest_args(model_dir, prompt_file, tmp_path / "two")]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = ActivationStore(tmp_path / "one"), ActivationStore(tmp_path / "two")
    assert [s.prompts for s in two.shards] == [s.prompts for s in one.shards]
    for site in SITES.split(","):
        a1, m1 = one.load(site)
        a2, m2 = two.load(site)
        torch.testing.assert_close(a2, a1, rtol=1e-5, atol=1e-6)
        assert all(torch.equal(m1[k], m2[k]) for k in m1)


def test_bf16_storage_halves_the_bytes(model_dir, prompt_file, tmp_path):
    harvest.main(harvest_args(model_dir, prompt_file, tmp_path / "f32"))
    harvest.main(harvest_args(model_dir, prompt_file, tmp_path / "bf16", "--dtype", "bfloat16"))  # last wins
    a32, _ = ActivationStore(tmp_path / "f32").load("transformer_blocks.1.image")
    a16, _ = ActivationStore(tmp_path / "bf16").load("transformer_blocks.1.image", dtype=torch.float32)
    torch.testing.assert_close(a16, a32, rtol=1e-2, atol=1e-2)
    size = lambda f: sum(p.stat().st_size for p in (f / "shards").glob("*.safetensors"))
    assert size(tmp_path / "bf16") < 0.7 * size(tmp_path / "f32")


def test_bad_inputs_get_clear_errors(model_dir, prompt_file, tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        harvest.main(harvest_args(model_dir, tmp_path / "missing.txt", tmp_path / "x"))
    with pytest.raises(SystemExit, match="outside 0..3"):
        harvest.main([*harvest_args(model_dir, prompt_file, tmp_path / "x"), "--steps", "2,7"])
    with pytest.raises(ValueError, match="transformer_blocks"):
        harvest.main(
            harvest_args(model_dir, prompt_file, tmp_path / "y", "--sites", "transformer_blocks.9.image")
        )
    harvest.main(harvest_args(model_dir, prompt_file, tmp_path / "h"))
    with pytest.raises(SystemExit, match="other settings.*steps"):
        harvest.main([*harvest_args(model_dir, prompt_file, tmp_path / "h"), "--steps", "0"])
    store = ActivationStore(tmp_path / "h")
    with pytest.raises(ActivationStoreError, match="was not harvested"):
        store.load("transformer_blocks.0.image")
    shard = store.shards[1].path
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ActivationStoreError, match=f"{shard.name}.*unreadable"):
        ActivationStore(tmp_path / "h")
    with pytest.raises(ActivationStoreError, match="not a harvest folder"):
        ActivationStore(tmp_path)


def test_prompts_from_a_dataset_column(model_dir, tmp_path):
    """A Hugging Face dataset (here a local parquet folder, as the Hub's cc12m captions are stored)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "captions"
    data.mkdir()
    table = pa.table({"url": [f"u{i}" for i in range(6)], "caption_llava_short": PROMPTS[:5] + [""]})
    pq.write_table(table, data / "train-00000.parquet")
    args = harvest_args(model_dir, "unused", tmp_path / "h", "--n-prompts", "4")
    args[args.index("--prompts") : args.index("--prompts") + 2] = ["--dataset", str(data)]
    harvest.main(args)
    store = ActivationStore(tmp_path / "h")
    assert [p["prompt"] for p in store.prompts()] == PROMPTS[:4]
    assert store.config["prompt_source"] == str(data) and store.config["column"] == "caption_llava_short"
    with pytest.raises(SystemExit, match="no column 'text'"):
        harvest.main([*args, "--column", "text", "--out", str(tmp_path / "h2")])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompts-per-shard", "0"], "--prompts-per-shard must be an integer >= 1, got 0"),
        (["--prompts-per-shard=-1"], "--prompts-per-shard must be an integer >= 1, got -1"),
        (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
        (["--steps", "abc"], "--steps abc: 'abc' is not a step or a range of steps"),
        (["--steps=-1"], "--steps -1: '-1' is not a step"),
        (["--steps", "5-2"], "--steps 5-2: 5-2 is an empty range; write 2-5"),
        (["--threads=-1"], "--threads must be an integer >= 1, got -1"),
        (["--num-inference-steps", "0"], r"--num-inference-steps must be an integer in \[1, 1000\], got 0"),
        (["--seed", str(2**70)], f"--seed must be an integer in \\[0, {2**62}\\], got {2**70}"),
        (["--n-prompts", "0"], "--n-prompts must be an integer >= 1, got 0"),
        (["--n-prompts=-5"], "--n-prompts must be an integer >= 1, got -5"),
        (["--height", "100000"], r"--height must be an integer in \[8, 4096\], got 100000"),
        (["--height", "36"], "--height 36 is not a multiple of 8 px.*use 32"),
        (["--true-cfg-scale", "inf"], "--true-cfg-scale: 'inf' is not a finite number"),
        (["--true-cfg-scale", "nan"], "--true-cfg-scale: 'nan' is not a finite number"),
        (["--max-sequence-length", "0"], r"--max-sequence-length must be an integer in \[1, 512\], got 0"),
        (["--prompts", "shapes", "--n-prompts", str(10**12)], "This harvest needs about .* of disk.*fewer"),
    ],
)
def test_settings_that_cannot_work_are_refused_before_any_work(model_dir, prompt_file, tmp_path, extra,
                                                               message):  # fmt: skip
    with pytest.raises(SystemExit, match=message):
        harvest.main(harvest_args(model_dir, prompt_file, tmp_path / "h", *extra))
    assert not (tmp_path / "h").exists()


def test_an_out_that_is_a_file_or_prompts_that_are_not_utf8_are_named(model_dir, prompt_file, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(SystemExit, match=f"--out {tmp_path / 'file'} is a file; pass a folder"):
        harvest.main(harvest_args(model_dir, prompt_file, tmp_path / "file"))
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("a red circle\nun carré bleu\n".encode("latin-1"))
    with pytest.raises(SystemExit, match=f"--prompts {latin} is not UTF-8 text \\(line 2.*save it as UTF-8"):
        harvest.main(harvest_args(model_dir, latin, tmp_path / "h"))
    assert not (tmp_path / "h").exists()


def test_non_finite_activations_stop_the_harvest_naming_the_prompts(prompt_file, tmp_path):
    pipe = tiny_flux_pipeline(seed=0)
    with torch.no_grad():  # a model that overflows: one weight of block 0 is inf
        next(pipe.transformer.transformer_blocks[0].ff.parameters()).view(-1)[0] = float("inf")
    pipe.save_pretrained(tmp_path / "broken")
    named = r"hold NaN/inf for prompt\(s\) 0: 'a red circle'; 1: 'a blue square'.*Their shard was not written"
    with pytest.raises(SystemExit, match=named):
        harvest.main(harvest_args(tmp_path / "broken", prompt_file, tmp_path / "h"))
    assert not list((tmp_path / "h" / "shards").glob("*"))
    with pytest.raises(ActivationStoreError, match="unfinished harvest"):
        ActivationStore(tmp_path / "h")
