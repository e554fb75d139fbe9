"""The Hub side: download one site pinned to a revision, the offline cache, errors, publish (dry run and
upload) and the Space, all with the real huggingface_hub client against a loopback Hub (hub_server.py)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from hub_server import HubServer

import fluxsae
from fluxsae.hub import DictionaryNotFoundError, shapes_dictionaries_dir
from fluxsae.labels import NEW_COLUMNS, LabelsNotFoundError, load_labels
from fluxsae.releases import RELEASES, resolve
from fluxsae.sae import SAEConfig, TopKSAE
from training import publish

SITES = ("transformer_blocks.3.image", "single_transformer_blocks.2.image")
PACKAGED = shapes_dictionaries_dir()
REPO = "fluxsae/shapes-saes"


def state(d) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in d.state_dict().items()}


def same(a, b) -> bool:
    sa, sb = state(a), state(b)
    return (
        type(a) is type(b)
        and a.cfg == b.cfg
        and sa.keys() == sb.keys()
        and all(torch.equal(sa[k], sb[k]) for k in sa)
    )


def card_meta(path: Path) -> dict:
    """The YAML metadata block of a card, parsed (what the Hub validates)."""
    import yaml

    text = path.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text[4:].split("\n---\n", 1)[0])


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A loopback Hub with the client pointed at it (HF_ENDPOINT), online, an empty cache, no Xet."""
    from huggingface_hub import HfFileSystem, constants

    HfFileSystem.clear_instance_cache()  # fsspec caches instances, with a previous test's endpoint
    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", "hf_loopback")
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # Xet's CAS protocol is not served
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
        yield server
    HfFileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def staged_sae(tmp_path_factory):
    """The packaged SAE repo, staged by the publish command's dry run."""
    out = tmp_path_factory.mktemp("staged") / "sae"
    publish.main(["model", REPO, "--from", str(PACKAGED / "sae"), "--dry-run", str(out)])
    return out


# -- download ----------------------------------------------------------------------------------------


def test_load_sae_fetches_only_its_site_at_the_pinned_revision(hub, staged_sae):
    files = files_of(staged_sae)
    first = hub.add_repo(REPO, files)
    # A later commit on main changes the SAE: the pinned revision must still give the first one.
    changed = dict(files)
    other = TopKSAE(SAEConfig(d_in=128, n_features=2048, k=24, site=SITES[0]))
    tmp = staged_sae.parent / "other"
    other.save(tmp)
    changed[f"{SITES[0]}/sae.safetensors"] = (tmp / "sae.safetensors").read_bytes()
    changed[f"{SITES[0]}/cfg.json"] = (tmp / "cfg.json").read_bytes()
    hub._commit("model", REPO, "main", changed)

    hub.reset_counts()
    sae = fluxsae.load_sae(REPO, site=SITES[0], revision=first)
    assert same(sae, fluxsae.load_sae("shapes", site=SITES[0]))  # bit-exact, the pinned commit
    fetched = sorted(
        p.split(f"/resolve/{first}/", 1)[1] for m, p in hub.requests if "/resolve/" in p and m == "GET"
    )
    assert fetched == sorted(["config.json", *(f for f in files if f.startswith(SITES[0] + "/"))])
    assert f"{SITES[0]}/sae.safetensors" in fetched
    assert not any(SITES[1] in p for _, p in hub.requests if "/resolve/" in p)
    site_bytes = sum(len(files[f]) for f in fetched)
    assert site_bytes <= hub.bytes_sent < site_bytes + 20_000  # + the tree listing: the other site is 1 MB
    assert len(files[f"{SITES[1]}/sae.safetensors"]) > 1_000_000

    latest = fluxsae.load_sae(REPO, site=SITES[0])  # main: the later commit
    assert torch.equal(latest.W_enc, other.W_enc) and not torch.equal(latest.W_enc, sae.W_enc)


def test_offline_cache_works_and_a_miss_names_repo_site_and_what_to_do(hub, staged_sae, monkeypatch):
    from huggingface_hub import constants

    sha = hub.add_repo(REPO, files_of(staged_sae))
    online = fluxsae.load_sae(REPO, site=SITES[0], revision=sha)
    main = fluxsae.load_sae(REPO, site=SITES[0])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.reset_counts()
    assert same(fluxsae.load_sae(REPO, site=SITES[0], revision=sha), online)
    assert same(fluxsae.load_sae(REPO, site=SITES[0]), main)  # the branch, from refs/main
    assert hub.requests == []  # nothing reached the server
    with pytest.raises(DictionaryNotFoundError) as err:
        fluxsae.load_sae(REPO, site=SITES[1], revision=sha)
    message = str(err.value)
    assert REPO in message and SITES[1] in message and "HF_HUB_OFFLINE" in message
    assert f"hf download {REPO} --include '{SITES[1]}/*'" in message and f"--revision {sha}" in message


def test_missing_repo_revision_and_site_say_so(hub, staged_sae):
    with pytest.raises(DictionaryNotFoundError, match="has no repo 'nobody/nothing'"):
        fluxsae.load_sae("nobody/nothing", site=SITES[0])
    hub.add_repo(REPO, files_of(staged_sae))
    with pytest.raises(DictionaryNotFoundError, match="has no revision 'v9'"):
        fluxsae.load_sae(REPO, site=SITES[0], revision="v9")
    # A site the repo lacks: the root config.json (all that was fetched) lists the ones it has.
    have = ", ".join(sorted(p.parent.name for p in (PACKAGED / "sae").glob("*/sae.safetensors")))
    assert SITES[0] in have and SITES[1] in have
    with pytest.raises(DictionaryNotFoundError, match=f"it has: {re.escape(have)}\\."):
        fluxsae.load_sae(REPO, site="transformer_blocks.0.image")


def test_hf_endpoint_in_a_fresh_process(hub, staged_sae, tmp_path):
    """The environment alone (HF_ENDPOINT, as a user sets it) points a new process at the loopback Hub."""
    sha = hub.add_repo(REPO, files_of(staged_sae))
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(tmp_path / "home"),
    }
    code = (
        f"import fluxsae; s = fluxsae.load_sae({REPO!r}, site={SITES[1]!r}, revision={sha!r}); "
        "print(s.site, s.n_features)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == [SITES[1], "2048"]


# -- publish -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["sae", "itda"])
def test_publish_dry_run_then_load_is_bit_exact_for_every_packaged_dictionary(method, tmp_path):
    out = tmp_path / method
    publish.main(
        ["model", f"fluxsae/shapes-{method}", "--from", str(PACKAGED / method), "--dry-run", str(out)]
    )
    card = (out / "README.md").read_text()
    # the Shapes model ships inside fluxsae and is published nowhere: the card names no base model
    assert "library_name: fluxsae" in card and "base_model" not in card and "| held-out FVU |" in card
    packaged = sorted(p.parent.name for p in (PACKAGED / method).glob(f"*/{method}.safetensors"))
    assert set(SITES) <= set(packaged)  # the image sites; the SAEs also cover the text streams
    assert json.loads((out / "config.json").read_text())["sites"] == packaged
    for site in packaged:
        assert same(
            fluxsae.load_dictionary(out, site=site),
            fluxsae.load_dictionary("shapes", site=site, method=method),
        )
    allowed = publish.SITE_FILES | {"README.md", "config.json", ".gitattributes"}
    assert {Path(f).name for f in publish.check_hub_rules(out)} <= allowed


def test_publish_uploads_only_allow_listed_validated_files(hub, tmp_path):
    repo = tmp_path / "run"
    sae = TopKSAE(SAEConfig(d_in=16, n_features=32, k=4, site=SITES[0], base_model="shapes"))
    sae.save(repo / SITES[0])
    (repo / SITES[0] / "optimizer.pt").write_bytes(b"x" * 100)  # training state: never published
    (repo / "work").mkdir()
    (repo / "work" / "checkpoint.safetensors").write_bytes(b"y")
    staged = tmp_path / "staged"
    publish.main(["model", "me/tiny-saes", "--from", str(repo), "--dry-run", str(staged)])
    assert sorted(files_of(staged)) == [
        ".gitattributes",
        "README.md",
        "config.json",
        f"{SITES[0]}/cfg.json",
        f"{SITES[0]}/sae.safetensors",
    ]
    ops = publish.commit_operations(staged)
    assert sorted(op.path_in_repo for op in ops) == sorted(files_of(staged))

    info = publish.upload(staged, "me/tiny-saes")
    assert hub.validated[-1]["library_name"] == "fluxsae"  # the card's YAML, checked by the Hub's route
    assert hub.tree("me/tiny-saes") == files_of(staged)  # byte for byte
    lines = hub.commits[-1]["lines"]
    assert {v["value"]["path"] for v in lines if v["key"] == "lfsFile"} == {f"{SITES[0]}/sae.safetensors"}
    assert info.oid == hub.repos[("model", "me/tiny-saes")]["refs"]["main"]
    assert same(fluxsae.load_sae("me/tiny-saes", site=SITES[0]), TopKSAE.load(repo / SITES[0]))

    broken = tmp_path / "broken"
    sae.save(broken / SITES[0])
    with pytest.raises(ValueError, match="is named after site"):
        sae.save(broken / SITES[1])  # refused: it would not load from there
    (broken / SITES[0]).rename(broken / SITES[1])  # cfg.json says SITES[0]: a folder is named after its site
    renamed = "says site 'transformer_blocks.3.image' but its folder is named after"
    with pytest.raises(SystemExit, match=renamed):
        publish.main(["model", "me/x", "--from", str(broken), "--dry-run", str(tmp_path / "nope")])


def test_label_dataset_stages_with_configs_and_loads(tmp_path, monkeypatch):
    import datasets.config
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")

    src = tmp_path / "labels"
    src.mkdir()
    for i in range(2):
        table = pa.table(
            {
                "site": [SITES[0]] * 3,
                "method": ["sae", "itda", "mlp"],
                "feature": [i, i + 1, i + 2],
                "label": ["red", "circle", "large"],
                "score": [0.9, 0.8, 0.7],
            }
        )
        pq.write_table(table, src / f"part{i}.parquet")
    out = tmp_path / "staged"
    publish.main(["dataset", "me/labels", "--from", str(src), "--dry-run", str(out)])
    meta = card_meta(out / "README.md")
    assert meta["configs"] == [
        {"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}
    ]
    labels = load_labels(out)
    assert len(labels) == 6 and set(labels.column_names) >= set(publish.LABEL_COLUMNS)
    assert labels[4]["label"] == "circle"
    pq.write_table(pa.table({"site": [SITES[0]], "feature": [0]}), src / "bad.parquet")
    with pytest.raises(SystemExit, match="lacks label columns"):
        publish.main(["dataset", "me/labels", "--from", str(src), "--dry-run", str(tmp_path / "again")])
    with pytest.raises(LabelsNotFoundError, match="not a label dataset folder"):
        load_labels(src)  # loose shards without a card are no dataset yet: staging makes one


def test_label_dataset_uploads_and_loads_back_from_the_hub_bit_exact(hub, tmp_path, monkeypatch):
    import datasets.config
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", hub.url)  # read from HF_ENDPOINT at import
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    src = tmp_path / "labels"
    src.mkdir()
    table = pa.table(
        {
            "site": [SITES[1]] * 4,
            "method": ["sae", "sae", "itda", "mlp"],
            "feature": [0, 7, 3, 11],
            "label": ["blue", "square", "top left", "small"],
            "score": [0.91, 0.5, 0.25, 0.125],
        }
    )
    pq.write_table(table, src / "labels.parquet")
    staged = tmp_path / "staged"
    publish.main(["dataset", "me/labels", "--from", str(src), "--dry-run", str(staged)])
    info = publish.upload(staged, "me/labels", repo_type="dataset")
    assert hub.tree("me/labels", repo_type="dataset") == files_of(staged)
    assert hub.validated[-1]["configs"][0]["data_files"][0]["path"] == "data/train-*.parquet"
    loaded = load_labels("me/labels", revision=info.oid).to_dict()
    assert {k: v for k, v in loaded.items() if k in table.column_names} == table.to_pydict()  # as written
    assert all(loaded[c] == [None] * 4 for c in NEW_COLUMNS)  # a dataset without detection scores


def test_space_folder_is_assembled_the_same_way(tmp_path):
    out = tmp_path / "space"
    publish.main(["space", "me/fluxsae-demo", "--dry-run", str(out)])
    files = set(files_of(out))
    assert {"app.py", "app_actions.py", "app_views.py", "app_panels.py", "app_words.py", "app_labels.py",
            "app_images.py", "requirements.txt", "README.md", ".gitattributes",
            "fluxsae/__init__.py"} <= files  # fmt: skip
    assert "fluxsae/shapes/model/transformer/diffusion_pytorch_model.safetensors" in files
    assert f"fluxsae/shapes/dictionaries/sae/{SITES[0]}/sae.safetensors" in files
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)
    meta = card_meta(out / "README.md")
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    assert meta["models"] == []  # the Shapes model ships inside fluxsae: no Hub id to name
    pins = [r for r in (out / "requirements.txt").read_text().splitlines() if not r.startswith("#")]
    assert pins and all("==" in r for r in pins)  # the versions CI tests, not whatever is newest
    assert meta["sdk_version"] and meta["python_version"] == "3.11"
    big = [f for f in files if (out / f).stat().st_size > publish.MAX_REGULAR_BYTES]
    assert big and all(f.endswith(publish.LFS_SUFFIXES) for f in big)  # the 14 MB transformer goes via LFS


def test_hub_size_rules_refuse_big_plain_files(tmp_path):
    (tmp_path / "notes.txt").write_bytes(b"a" * (publish.MAX_REGULAR_BYTES + 1))
    with pytest.raises(publish.PublishError, match="10 MiB"):
        publish.check_hub_rules(tmp_path)


def test_releases_resolve_short_names():
    where, revision = resolve("shapes", "itda")
    assert Path(where) == PACKAGED / "itda" and revision is None
    assert resolve("user/repo", "sae", "abc") == ("user/repo", "abc")
    assert set(RELEASES["shapes"].sites) == set(SITES)
    with pytest.raises(ValueError, match="no 'mlp'"):
        resolve("shapes", "mlp")


# -- the app's command line (the Space runs `python app.py`) ---------------------------------------


@pytest.fixture
def app_module(monkeypatch):
    import app

    launched = {}

    class Demo:
        def queue(self):
            return self

        def launch(self, **kw):
            launched.update(kw)

    monkeypatch.setattr(app, "load_app_pipeline", lambda model, quantize: (None, model, None))
    monkeypatch.setattr(app, "build_demo", lambda pipe, name, note: Demo())
    return app, launched


def test_app_honours_gradio_environment_and_flags_win(app_module, monkeypatch):
    app, launched = app_module
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")  # what a Space sets
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    app.main(["--model", "tiny"])
    assert (launched["server_name"], launched["server_port"]) == ("0.0.0.0", 7999)
    app.main(["--model", "tiny", "--host", "127.0.0.1", "--port", "8001"])
    assert (launched["server_name"], launched["server_port"]) == ("127.0.0.1", 8001)
    monkeypatch.delenv("GRADIO_SERVER_NAME")
    monkeypatch.delenv("GRADIO_SERVER_PORT")
    app.main(["--model", "tiny"])
    assert (launched["server_name"], launched["server_port"]) == ("127.0.0.1", None)  # Gradio picks 7860+
    monkeypatch.setenv("GRADIO_SERVER_PORT", "http")
    with pytest.raises(SystemExit, match="GRADIO_SERVER_PORT='http' is not a port number"):
        app.main(["--model", "tiny"])


def test_app_busy_port_names_the_variable_that_works(monkeypatch):
    import app

    monkeypatch.setattr(
        app, "load_app_pipeline", lambda model, quantize: (app.tiny_flux_pipeline(), "tiny", None)
    )
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setenv("GRADIO_SERVER_PORT", str(port))
        with pytest.raises(SystemExit, match=f"Port {port} .*from GRADIO_SERVER_PORT.*--port"):
            app.main(["--model", "tiny"])


def test_app_uses_spaces_gpu_when_present_without_pickling_the_pipeline(app_module, monkeypatch):
    import inspect

    app, _ = app_module
    decorated, calls = [], []

    def GPU(duration=60):  # the shape of spaces.GPU(duration=...)
        def decorate(fn):
            decorated.append(fn)
            return fn

        return decorate

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=GPU))
    monkeypatch.setattr(app, "run", lambda *a: calls.append(a) or "image")  # the CPU work, restored after
    pipe = object()
    monkeypatch.setattr(app, "load_app_pipeline", lambda model, quantize: (pipe, model, None))
    app.main(["--model", "tiny"])
    app.main(["--model", "tiny"])  # twice: the CPU function is wrapped once, not twice
    assert len(decorated) == 2 and "pipe" not in str(inspect.signature(decorated[-1]))
    assert app.run(pipe, "a red circle", 0, SITES[0], 3, {}) == "image"
    assert calls == [(pipe, "a red circle", 0, SITES[0], 3, {})]
    monkeypatch.delitem(sys.modules, "spaces")
    before = app.run
    app.main(["--model", "tiny"])  # no spaces package: nothing changes
    assert app.run is before
