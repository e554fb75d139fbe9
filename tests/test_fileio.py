"""The file layer under a full disk: every artifact writer (SAE, ITDA, feature statistics, label dataset,
harvest shards and manifest) is made to fail with ENOSPC at each step of its write in turn. Each time the
old artifact must be left byte for byte, nothing half-written may load, no temporary file may stay
behind, and the next write must succeed. Files get the mode the umask asks for."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from PIL import Image

import fluxsae
from fluxsae import fileio
from fluxsae.activations import ActivationStore, ActivationStoreError
from fluxsae.dictionary import DictionaryLoadError
from fluxsae.feature_stats import FeatureStats
from fluxsae.fileio import load_tensors
from fluxsae.itda import ITDA, ITDAConfig
from fluxsae.sae import SAEConfig, TopKSAE
from fluxsae.tiny import TINY_GENERATION, tiny_flux_pipeline

SITE = "transformer_blocks.1.image"


class FullDisk:
    """Replaces `fluxsae.fileio._step`: the `at`-th step of a write raises ENOSPC, as a full disk would.
    A failing "write" step first cuts the temporary file (or the largest file of a temporary folder) to
    half, like a write that ran out of room part-way. `at=None` only counts the steps."""

    def __init__(self, at: int | None = None):
        self.at, self.calls = at, 0

    def __call__(self, what: str, path: Path) -> None:
        self.calls += 1
        if self.calls != self.at:
            return
        if what == "write":
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            if files:
                torn = max(files, key=lambda p: p.stat().st_size)
                torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (or the file itself) and its bytes."""
    if folder.is_file():
        return {folder.name: folder.read_bytes()}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name)


def steps_of(write, monkeypatch) -> int:
    counter = FullDisk()
    monkeypatch.setattr(fileio, "_step", counter)
    write()
    monkeypatch.undo()
    return counter.calls


def check_every_failure(target: Path, write_old, write_new, loads, monkeypatch) -> int:
    """Write the old artifact, then fail the new write at each of its steps in turn; after each failure
    the old one is intact and loads (`loads(target)`), and nothing is left behind. Returns the steps."""
    n = steps_of(write_new, monkeypatch)  # a clean write, counted ...
    write_old()  # ... then the old one over it
    old = snapshot(target)
    assert n >= 3  # written, synced, renamed
    for at in range(1, n + 1):
        monkeypatch.setattr(fileio, "_step", FullDisk(at))
        with pytest.raises(OSError) as failed:
            write_new()
        monkeypatch.undo()
        assert failed.value.errno == errno.ENOSPC, at
        assert snapshot(target) == old, f"the old artifact changed when step {at} of {n} failed"
        assert not leftovers(target.parent), at
        loads(target)
    write_new()
    assert snapshot(target) != old
    return n


def sae(seed: int, k: int = 4) -> TopKSAE:
    torch.manual_seed(seed)
    return TopKSAE(SAEConfig(d_in=16, n_features=32, k=k, site=SITE, mean_token_norm=2.0))


def test_an_sae_save_that_fails_at_any_step_leaves_the_old_sae(tmp_path, monkeypatch):
    folder = tmp_path / "saes" / SITE
    old, new = sae(0, k=16), sae(1, k=4)
    (tmp_path / "saes").mkdir()

    def loads(target):
        assert TopKSAE.load(target).cfg.k == 16

    check_every_failure(folder, lambda: old.save(folder), lambda: new.save(folder), loads, monkeypatch)
    assert TopKSAE.load(folder).cfg.k == 4 and torch.equal(TopKSAE.load(folder).W_dec, new.W_dec)


def itda(seed: int, n: int) -> ITDA:
    g = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(n, 16, generator=g), dim=1)
    prov = {"prompt_id": list(range(seed, seed + n)), "prompt": [f"prompt {seed}"] * n}
    return ITDA(ITDAConfig(d_in=16, k=4, site=SITE, mean_token_norm=1.0), atoms, prov)


def prompt_ids(d: ITDA) -> list[int]:
    return [p["prompt_id"] for p in d.provenance]


def test_an_itda_save_that_fails_at_any_step_never_mixes_old_atoms_and_new_provenance(tmp_path, monkeypatch):
    folder = tmp_path / "itdas" / SITE
    old, new = itda(0, 12), itda(100, 12)  # the same size: only a whole-folder write tells them apart

    def loads(target):
        back = ITDA.load(target)
        assert torch.equal(back.atoms, old.atoms) and prompt_ids(back) == prompt_ids(old)

    steps = check_every_failure(
        folder, lambda: old.save(folder), lambda: new.save(folder), loads, monkeypatch
    )
    assert steps >= 5  # three files synced, the folder written and moved
    back = ITDA.load(folder)
    assert torch.equal(back.atoms, new.atoms) and prompt_ids(back) == prompt_ids(new) == list(range(100, 112))


def stats(value: float) -> FeatureStats:
    return FeatureStats(
        site=SITE, steps=(0, 1), tokens=torch.tensor([10, 10]), fires=torch.full((2, 32), 3),
        activation_sum=torch.full((2, 32), value, dtype=torch.float64), max_activation=torch.ones(32),
    )  # fmt: skip


def test_feature_stats_that_fail_to_save_leave_the_old_ones(tmp_path, monkeypatch):
    folder = tmp_path / SITE
    sae(0).save(folder)
    path = folder / "feature_stats.safetensors"

    def loads(target):
        assert FeatureStats.load(target).activation_sum[0, 0] == 1.0

    check_every_failure(
        path, lambda: stats(1.0).save(folder), lambda: stats(2.0).save(folder), loads, monkeypatch
    )
    assert FeatureStats.load(path).activation_sum[0, 0] == 2.0
    # Saving the SAE again replaces its folder in one step and keeps the statistics beside it.
    sae(1).save(folder)
    assert FeatureStats.load(path).activation_sum[0, 0] == 2.0


def test_a_label_dataset_that_fails_to_write_leaves_the_old_one(tmp_path, monkeypatch):
    from fluxsae.labels import load_labels, write_labels

    folder = tmp_path / "labels"
    images = [{"image_id": 0, "prompt": "p", "seed": 0, "scene": None, "image": Image.new("RGB", (8, 8))}]

    def rows(label):
        return [{"site": SITE, "method": "sae", "feature": f, "label": label, "status": "ok"}
                for f in range(3)]  # fmt: skip

    def old():
        write_labels(folder, rows("old"), images)

    def new():
        write_labels(folder, rows("new"), images)

    # The old folder stays byte for byte (loading it after each of the failures would be slow).
    check_every_failure(folder, old, new, lambda target: None, monkeypatch)
    assert set(load_labels(folder)["label"]) == {"new"}


# -- harvest -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_model")
    tiny_flux_pipeline(seed=0).save_pretrained(folder)
    return folder


def shards(folder: Path) -> dict[str, tuple]:
    """name -> (tensors, metadata) of the complete shards of a harvest folder."""
    found = sorted((folder / "shards").glob("shard-*.safetensors")) if (folder / "shards").is_dir() else []
    return {p.name: load_tensors(p) for p in found}


def same_shard(a: tuple, b: tuple) -> bool:
    (ta, ma), (tb, mb) = a, b
    return ma == mb and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def harvest_args(model: Path, prompts: Path, out: Path) -> list[str]:
    g = TINY_GENERATION
    return [
        "--model", str(model), "--prompts", str(prompts), "--sites", SITE, "--out", str(out),
        "--height", str(g["height"]), "--width", str(g["width"]), "--num-inference-steps",
        str(g["num_inference_steps"]), "--max-sequence-length", str(g["max_sequence_length"]),
        "--prompts-per-shard", "2", "--batch-size", "2", "--dtype", "float32",
    ]  # fmt: skip


def test_a_harvest_on_a_full_disk_never_reads_half_done_and_resumes_to_the_same_shards(
    tiny_model, tmp_path, monkeypatch
):
    from training import harvest

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\nthe green triangle\n")
    pipe = fluxsae.load_pipeline(tiny_model)
    monkeypatch.setattr(harvest, "load_pipeline", lambda *a, **k: pipe)  # one load for the 20 runs
    harvest.main(harvest_args(tiny_model, prompts, tmp_path / "clean"))
    clean = shards(tmp_path / "clean")
    counter = FullDisk()
    monkeypatch.setattr(fileio, "_step", counter)
    harvest.main(harvest_args(tiny_model, prompts, tmp_path / "count"))
    n = counter.calls
    assert n == 3 * 5  # harvest.json, prompts.jsonl, 2 shards, manifest.json: written, synced, renamed
    for at in range(1, n + 1):
        out = tmp_path / f"h{at}"
        monkeypatch.setattr(fileio, "_step", FullDisk(at))
        with pytest.raises(OSError) as failed:
            harvest.main(harvest_args(tiny_model, prompts, out))
        monkeypatch.setattr(fileio, "_step", lambda what, path: None)
        assert failed.value.errno == errno.ENOSPC
        assert not leftovers(out), at
        for name, shard in shards(out).items():  # each whole, or not there
            assert same_shard(shard, clean[name]), (at, name)
        if at <= n - 3:  # manifest.json is not written: nothing reads the harvest
            with pytest.raises(ActivationStoreError, match="harvest.json is missing|unfinished harvest"):
                ActivationStore(out)
        harvest.main(harvest_args(tiny_model, prompts, out))  # the same command again
        done = shards(out)
        assert list(done) == list(clean) and all(same_shard(done[k], clean[k]) for k in done), at
        assert len(ActivationStore(out).shards) == 2
    # A shard lost afterwards (deleted to be redone) is noticed, not trained without.
    (out / "shards" / "shard-000001.safetensors").unlink()
    with pytest.raises(ActivationStoreError, match="shard-000001.safetensors listed in manifest.json"):
        ActivationStore(out)


# -- modes and leftovers -----------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_and_folders_get_the_mode_the_umask_asks_for(tmp_path, mask):
    old = os.umask(mask)
    try:
        assert fileio.umask() == mask
        sae(0).save(tmp_path / SITE)
        fileio.write_json(tmp_path / "x.json", {"a": 1})
        itda(0, 4).save(tmp_path / "itda" / SITE)
    finally:
        os.umask(old)
    for path in [tmp_path / SITE, tmp_path / "itda" / SITE]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~mask, path
        for f in path.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o666 & ~mask


def test_temporary_copies_of_a_killed_writer_are_cleared_and_a_running_ones_kept(tmp_path):
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    (tmp_path / f".{SITE}.tmp-{dead}-abc").mkdir()  # left by a writer that was killed
    (tmp_path / f".{SITE}.old-{dead}-abc").mkdir()
    running = tmp_path / f".{SITE}.tmp-{os.getppid()}-abc"  # a writer still at work
    running.mkdir()
    sae(0).save(tmp_path / SITE)
    assert leftovers(tmp_path) == [running.name]


def test_an_interrupted_folder_swap_says_where_the_old_folder_is(tmp_path):
    aside = tmp_path / f".{SITE}.old-1-abc" / SITE
    sae(0).save(aside)  # the state a crash between the two renames of the fallback leaves
    with pytest.raises(DictionaryLoadError, match=f"interrupted save left the previous one at {aside}"):
        TopKSAE.load(tmp_path / SITE)
    shutil.move(aside, tmp_path / SITE)
    assert TopKSAE.load(tmp_path / SITE).cfg.k == 4
