"""Publish dictionaries, label datasets and the Space to the Hugging Face Hub, or write them to a folder.

    python -m training.publish model user/flux-saes --from runs/saes [--revision main] [--dry-run DIR]
    python -m training.publish dataset user/flux-labels --from runs/labels [--dry-run DIR]
    python -m training.publish space [user/fluxsae-demo] --model shapes [--dry-run DIR]

Each command first stages the repo in a folder, exactly as it will be uploaded: allow-listed files only
(never optimiser state, work folders or caches), every file validated by loading it (dictionaries through
fluxsae's own loaders, shapes and configs checked, and read back bit-exact from the staged copy; parquet
shards through `datasets.load_dataset`), a root `config.json` and the card rendered from `hub_cards/`.
`--dry-run DIR` stops there and leaves the folder in DIR; otherwise the staged folder is committed in one
commit (`create_repo(exist_ok=True)`, then `create_commit` of `commit_operations(folder)`).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from string import Template

import torch

import fluxsae
from fluxsae.dictionary import CFG_FILE, load_folder
from fluxsae.sites import parse_site

ROOT = Path(__file__).resolve().parent.parent
CARDS = ROOT / "hub_cards"
SITE_FILES = {"cfg.json", "sae.safetensors", "itda.safetensors", "atoms.parquet", "feature_stats.safetensors"}
"""The only files of a site folder that are published."""
LABEL_COLUMNS = {
    "site": "string",
    "method": "string",
    "feature": "int64",
    "label": "string",
    "score": "double",
}
"""Columns every label dataset has (more may follow: statistics, example references)."""
LFS_SUFFIXES = (".safetensors", ".parquet", ".pth", ".bin", ".png", ".jpg", ".webp", ".gif", ".pt")
"""Binary files: the Hub stores them with LFS/Xet (they are listed in the staged .gitattributes)."""
MAX_REGULAR_BYTES, MAX_FILE_BYTES = 10 * 2**20, 50 * 10**9
"""Hub rules: plain git files over 10 MiB are refused (binaries go through LFS/Xet); no file over 50 GB."""
LICENSES = {
    "shapes": ("apache-2.0", None),
    "black-forest-labs/FLUX.1-schnell": ("apache-2.0", None),
    "black-forest-labs/FLUX.1-dev": ("other", "flux-1-dev-non-commercial-license"),
}
"""The base model's license, which its dictionaries inherit: (license, license_name)."""
SPACE_SHORT_DESCRIPTION = "Find, read and steer FLUX.1 features with SAEs and ITDA"
"""The Space's one line on the Hub (at most 60 characters)."""


class PublishError(ValueError):
    """A file would not be published as it is: says which and what to do."""


# -- cards -----------------------------------------------------------------------------------------


def render(template: str, **fields) -> str:
    """hub_cards/<template> with ${field} replaced; a missing field is an error, not an empty string."""
    return Template((CARDS / template).read_text()).substitute(**fields)


def _yaml_list(items) -> str:
    """A YAML flow sequence (JSON is YAML): ["a", "b"]."""
    return json.dumps([str(i) for i in items])


def _fmt(value, spec: str = ".3f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else ""


def metrics_table(dictionaries: dict[str, fluxsae.Dictionary]) -> str:
    """One row per site from each dictionary's own evaluation (cfg.extra: held_out, spliced)."""
    rows = [
        "| site | features | k | held-out FVU | L0 | dead | velocity recovered | image recovered |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for site, d in dictionaries.items():
        held, spliced = d.cfg.extra.get("held_out", {}), d.cfg.extra.get("spliced", {})
        dead = held.get("dead_fraction")
        rows.append(
            f"| {site} | {d.n_features} | {d.cfg.k} | {_fmt(held.get('fvu'))} "
            f"| {_fmt(held.get('l0'), '.1f')} "
            f"| {_fmt(dead * 100 if dead is not None else None, '.1f')}{'%' if dead is not None else ''} "
            f"| {_fmt(spliced.get('velocity_recovered'))} | {_fmt(spliced.get('image_recovered'))} |"
        )
    return "\n".join(rows)


# -- dictionaries --------------------------------------------------------------------------------


def _state(d) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in d.state_dict().items()}


def stage_model_repo(
    source: str | Path, out: str | Path, *, repo_id: str, revision: str | None = None
) -> list[str]:
    """Stage the dictionary repo in `source` (one folder per site) into the empty folder `out`: validated,
    allow-listed site files, a root config.json, README.md. Returns the staged paths, sorted."""
    source, out = Path(source), Path(out)
    sites = sorted(p for p in source.iterdir() if (p / CFG_FILE).is_file()) if source.is_dir() else []
    if not sites:
        raise PublishError(
            f"{source}: no <site>/cfg.json folders; pass the folder a training run wrote with --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    dictionaries, kinds = {}, set()
    for folder in sites:
        d = load_folder(folder)  # validates config, tensors, shapes (DictionaryLoadError says what is wrong)
        if str(parse_site(d.site)) != folder.name:
            raise PublishError(
                f"{folder}: cfg.json says site {d.site!r}; a site folder is named after its site"
            )
        kinds.add(d.cfg.architecture)
        extra = sorted(p.name for p in folder.iterdir() if p.name not in SITE_FILES)
        if extra:
            print(f"  {folder.name}: not published (not allow-listed): {', '.join(extra)}")
        (out / folder.name).mkdir(exist_ok=True)
        for name in sorted(SITE_FILES & {p.name for p in folder.iterdir()}):
            if name == "feature_stats.safetensors":
                _check_feature_stats(folder / name, d)
            shutil.copyfile(folder / name, out / folder.name / name)
        again = load_folder(out / folder.name)  # the staged copy is what will be uploaded: read it back
        a, b = _state(again), _state(d)
        if again.cfg != d.cfg or a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a):
            raise PublishError(f"{out / folder.name}: the staged copy does not read back bit-exact")
        dictionaries[folder.name] = d
    if len(kinds) > 1:
        raise PublishError(f"{source} mixes dictionary kinds {sorted(kinds)}; publish one kind per repo")
    kind = kinds.pop()
    method = "itda" if kind == "itda" else "sae"
    first = next(iter(dictionaries.values()))
    base = first.cfg.base_model
    root_cfg = {
        "library": "fluxsae",
        "method": method,
        "architecture": kind,
        "base_model": base,
        "sites": list(dictionaries),
        "fluxsae_version": fluxsae.__version__,
    }
    if (source / "config.json").is_file():  # the run's own record (command, settings) travels along
        run = json.loads((source / "config.json").read_text())
        if "command" in run:
            root_cfg["command"] = run["command"]
        if isinstance(run.get("settings"), dict):  # local paths (out, work folders) say nothing to a user
            root_cfg["settings"] = {
                k: v for k, v in run["settings"].items() if not str(v).startswith(("/", "runs/"))
            }
    (out / "config.json").write_text(json.dumps(root_cfg, indent=2, sort_keys=True) + "\n")
    license_, license_name = LICENSES.get(base, ("other", None))
    files = "\n".join(f"{s}/{n}" for s in dictionaries for n in sorted(p.name for p in (out / s).iterdir()))
    card = render(
        "model_card.md",
        # The Shapes model ships inside fluxsae and is published nowhere: no Hub id to name.
        base_model_yaml="" if base == "shapes" else f"\nbase_model: {base}",
        base_model_name=base,
        license=license_,
        license_name=f"\nlicense_name: {license_name}" if license_name else "",
        tags=_yaml_list(
            [
                "fluxsae",
                "flux",
                "interpretability",
                method,
                "sparse-autoencoder" if method == "sae" else "itda",
            ]
        ),
        datasets="[]",
        title=f"{'TopK sparse autoencoders' if method == 'sae' else 'ITDA dictionaries'} of {base}",
        method_description="TopK sparse autoencoders"
        if method == "sae"
        else "ITDA dictionaries (real activations, with their provenance in atoms.parquet)",
        fluxsae_version=fluxsae.__version__,
        metrics_table=metrics_table(dictionaries),
        loader="load_sae" if method == "sae" else "load_itda",
        repo_id=repo_id,
        first_site=next(iter(dictionaries)),
        revision_arg=f', revision="{revision}"' if revision else "",
        d_in=first.d_in,
        files_tree=files,
    )
    (out / "README.md").write_text(card)
    _write_gitattributes(out)
    return check_hub_rules(out)


def _check_feature_stats(path: Path, d) -> None:
    from fluxsae.feature_stats import FeatureStats

    try:
        FeatureStats.load(path).check_matches(d)
    except ValueError as err:
        raise PublishError(f"{path}: {err}") from err


# -- label datasets ---------------------------------------------------------------------------------


def stage_dataset_repo(
    source: str | Path, out: str | Path, *, repo_id: str, title: str | None = None
) -> list[str]:
    """Stage parquet shards (a file or a folder of *.parquet) as data/train-XXXXX-of-XXXXX.parquet with a
    dataset card whose `configs:` make `datasets.load_dataset(out)` work; checks the label columns and
    that load_dataset reads every row back."""
    import pyarrow.parquet as pq

    source, out = Path(source), Path(out)
    if source.is_dir() and (source / "README.md").is_file() and (source / "data").is_dir():
        return _stage_label_dataset(source, out)
    shards = sorted(source.rglob("*.parquet")) if source.is_dir() else [source]
    if not shards or not all(p.is_file() for p in shards):
        raise PublishError(f"{source}: no parquet shards to publish")
    (out / "data").mkdir(parents=True, exist_ok=True)
    schema, rows, bases = None, 0, set()
    for i, shard in enumerate(shards):
        table = pq.read_table(shard)
        missing = [c for c in LABEL_COLUMNS if c not in table.column_names]
        if missing:
            raise PublishError(
                f"{shard}: lacks label columns {missing} (every label dataset has {list(LABEL_COLUMNS)})"
            )
        if schema is not None and table.schema != schema:
            raise PublishError(f"{shard}: its columns differ from {shards[0]}; one schema for all shards")
        schema, rows = table.schema, rows + table.num_rows
        if "base_model" in table.column_names:
            bases.update(table.column("base_model").to_pylist())
        shutil.copyfile(shard, out / "data" / f"train-{i:05d}-of-{len(shards):05d}.parquet")
    base = ", ".join(sorted(map(str, bases))) or "the fluxsae dictionaries"
    described = {
        "site": "the site (`<block path>.<stream>`)",
        "method": '"sae", "itda" or "mlp"',
        "feature": "the feature (atom, neuron) index",
        "label": "what the feature detects",
        "score": "how well the label predicts the feature (0-1)",
    }
    columns = "\n".join(f"| {f.name} | {f.type} | {described.get(f.name, '')} |" for f in schema)
    card = render(
        "dataset_card.md",
        license="apache-2.0",
        title=title or f"fluxsae feature labels ({repo_id})",
        size_category=_size_category(rows),
        base_model_name=base,
        rows=rows,
        n_shards=len(shards),
        repo_id=repo_id,
        columns_table=columns,
        models="see the `site` and `method` columns",
        fluxsae_version=fluxsae.__version__,
    )
    (out / "README.md").write_text(card)
    _write_gitattributes(out)
    from fluxsae.labels import load_labels

    loaded = load_labels(out)
    if len(loaded) != rows:
        raise PublishError(f"{out}: load_dataset reads {len(loaded)} rows of {rows}")
    return check_hub_rules(out)


def _stage_label_dataset(source: Path, out: Path) -> list[str]:
    """Stage a dataset that `fluxsae.labels.write_labels` made (its card already names its configs):
    the card and its parquet shards only, each config read back through `load_labels`."""
    from fluxsae.labels import CONFIGS, load_labels

    shards = sorted(source.glob("data/**/*.parquet"))
    if not shards:
        raise PublishError(f"{source}: its data/ holds no parquet shards")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / "README.md", out / "README.md")
    for shard in shards:
        (out / shard.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shard, out / shard.relative_to(source))
    _write_gitattributes(out)
    named = [c for c in CONFIGS if f"config_name: {c}" in (out / "README.md").read_text()]
    if "labels" not in named:
        raise PublishError(f"{source}/README.md names no 'labels' config; write it with write_labels")
    for config in named:
        loaded = load_labels(out, config=config)
        if config == "labels" and (missing := [c for c in LABEL_COLUMNS if c not in loaded.column_names]):
            raise PublishError(f"{source}: its labels lack the columns {missing}")
    return check_hub_rules(out)


def _size_category(n: int) -> str:
    for limit, name in ((1e3, "n<1K"), (1e4, "1K<n<10K"), (1e5, "10K<n<100K"), (1e6, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M"


# -- the Space --------------------------------------------------------------------------------------

SPACE_PACKAGE_DATA = ("shapes/model", "shapes/dictionaries", "shapes/labels")
"""Folders of the fluxsae package the Space ships (the embedded model, its dictionaries and labels)."""


APP_MODULES = tuple(sorted(p.name for p in ROOT.glob("app*.py")))
"""The app: app.py (the Space's app_file) and the modules beside it (panels, handlers, views)."""


def pinned_requirements(requirements: str, constraints: str) -> str:
    """requirements.txt with every package pinned to the exact version of constraints.txt (the versions CI
    tests), so a Space built later installs what was tested, not whatever is newest. PublishError names
    a package constraints.txt does not pin."""
    pins = {}
    for line in constraints.splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[_normalised(name)] = version.strip()
    lines = ["# The versions fluxsae's CI tests (constraints.txt), pinned by `python -m training.publish`."]
    for line in requirements.splitlines():
        spec = line.split("#")[0].strip()
        if not spec:
            continue
        name = re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0]
        if _normalised(name) not in pins:
            raise PublishError(
                f"requirements.txt names {name!r}, which constraints.txt does not pin: add the version CI "
                "tests to constraints.txt"
            )
        lines.append(f"{name}=={pins[_normalised(name)]}")
    return "\n".join(lines) + "\n"


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def stage_space(
    out: str | Path, *, repo_id: str | None = None, model: str = "shapes", models: list[str] = (),
    datasets: list[str] = (),
) -> list[str]:  # fmt: skip
    """Stage the Space: the app (APP_MODULES), requirements.txt pinned to the versions CI tests, the
    fluxsae package (sources and the packaged Shapes model, dictionaries and labels), README.md (Spaces
    YAML), .gitattributes. Validates that every module compiles, every packaged dictionary loads and
    every file passes the Hub's size rules. `models`: Hub ids of the models and dictionary repos the app
    shows, for the card (the embedded Shapes model has none). `repo_id` is only named in messages."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for module in APP_MODULES:
        shutil.copyfile(ROOT / module, out / module)
    pins = (ROOT / "constraints.txt").read_text()
    (out / "requirements.txt").write_text(pinned_requirements((ROOT / "requirements.txt").read_text(), pins))
    package = ROOT / "fluxsae"
    for path in sorted(package.rglob("*")):
        rel = path.relative_to(package)
        data = any(str(rel).startswith(p + "/") for p in SPACE_PACKAGE_DATA)
        if not path.is_file() or "__pycache__" in rel.parts or not (path.suffix == ".py" or data):
            continue
        dest = out / "fluxsae" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    for path in sorted(out.rglob("*.py")):
        compile(path.read_text(), str(path), "exec")  # a syntax error would only show on the Space
    for cfg in sorted((out / "fluxsae" / "shapes" / "dictionaries").glob(f"*/*/{CFG_FILE}")):
        load_folder(cfg.parent)
    version = _installed("gradio") or "5.0.0"
    card = render(
        "space_card.md",
        title="fluxsae",
        sdk_version=version,
        python_version="3.11",
        license="apache-2.0",
        short_description=SPACE_SHORT_DESCRIPTION,
        models=_yaml_list([m for m in (models or [model]) if m != "shapes"]),
        datasets=_yaml_list(datasets),
        model=model,
    )
    (out / "README.md").write_text(card)
    _write_gitattributes(out)
    return check_hub_rules(out)


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# -- Hub rules and upload -----------------------------------------------------------------------------


def _write_gitattributes(out: Path) -> None:
    lines = [f"*{s} filter=lfs diff=lfs merge=lfs -text" for s in LFS_SUFFIXES]
    (out / ".gitattributes").write_text("\n".join(lines) + "\n")


def check_hub_rules(out: Path) -> list[str]:
    """The staged files (relative paths, sorted), after checking the Hub's size rules on each."""
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    for rel in files:
        size = (out / rel).stat().st_size
        if size > MAX_FILE_BYTES:
            raise PublishError(f"{rel}: {size / 1e9:.1f} GB; the Hub refuses files over 50 GB: shard it")
        if size > MAX_REGULAR_BYTES and not rel.endswith(LFS_SUFFIXES):
            raise PublishError(
                f"{rel}: {size / 2**20:.1f} MiB of plain git; the Hub refuses files over 10 MiB "
                "outside LFS/Xet: store it as safetensors/parquet or add its pattern to LFS"
            )
    return files


def commit_operations(staged: str | Path) -> list:
    """One CommitOperationAdd per staged file (path_in_repo = its path inside the staged folder)."""
    from huggingface_hub import CommitOperationAdd

    staged = Path(staged)
    return [
        CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(staged / rel))
        for rel in check_hub_rules(staged)
    ]


def upload(
    staged: str | Path,
    repo_id: str,
    *,
    repo_type: str = "model",
    revision: str | None = None,
    private: bool = False,
    message: str = "Publish with fluxsae",
    api=None,
):
    """Create the repo if needed and commit every staged file in one commit; returns the CommitInfo."""
    from huggingface_hub import HfApi

    api = api or HfApi()
    kw = {"space_sdk": "gradio"} if repo_type == "space" else {}
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True, **kw)
    if revision and revision != "main":
        api.create_branch(repo_id, repo_type=repo_type, branch=revision, exist_ok=True)
    ops = commit_operations(staged)
    return api.create_commit(repo_id, ops, commit_message=message, revision=revision, repo_type=repo_type)


# -- command line ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> Path | None:
    p = argparse.ArgumentParser(
        prog="python -m training.publish",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "what", choices=["model", "dataset", "space"], help="a dictionary repo, a label dataset or the Space"
    )
    p.add_argument(
        "repo_id", nargs="?", default=None,
        help="the Hub repo, e.g. user/flux-saes (a Space staged with --dry-run needs none)",
    )  # fmt: skip
    p.add_argument(
        "--from", dest="source", type=Path, help="model: the folder of site folders; dataset: parquet"
    )
    p.add_argument("--model", default="shapes", help="space: the model the app shows")
    p.add_argument("--revision", default=None, help="branch to commit to (created if missing; default main)")
    p.add_argument("--private", action="store_true")
    p.add_argument("--message", default="Publish with fluxsae")
    p.add_argument(
        "--dry-run",
        type=Path,
        metavar="DIR",
        help="write exactly what would be uploaded to DIR, upload nothing",
    )
    args = p.parse_args(argv)
    if args.what != "space" and args.source is None:
        p.error(f"{args.what} needs --from")
    if args.repo_id is None and (args.what != "space" or args.dry_run is None):
        why = "its card names it" if args.what != "space" else "it is uploaded there (--dry-run needs none)"
        p.error(f"{args.what} needs a repo id (e.g. user/fluxsae-{args.what}): {why}")
    if args.dry_run is not None and args.dry_run.exists() and any(args.dry_run.iterdir()):
        p.error(f"--dry-run {args.dry_run}: the folder is not empty; pass a new folder")
    out = args.dry_run or Path(tempfile.mkdtemp(prefix="fluxsae-publish-"))
    try:
        if args.what == "model":
            files = stage_model_repo(args.source, out, repo_id=args.repo_id, revision=args.revision)
        elif args.what == "dataset":
            files = stage_dataset_repo(args.source, out, repo_id=args.repo_id)
        else:
            files = stage_space(out, repo_id=args.repo_id, model=args.model)
    except (PublishError, fluxsae.DictionaryLoadError) as e:
        sys.exit(f"publish: {e}")
    total = sum((out / f).stat().st_size for f in files)
    print(f"staged {len(files)} files ({total / 2**20:.1f} MiB) in {out}")
    if args.dry_run is not None:
        return out
    repo_type = {"model": "model", "dataset": "dataset", "space": "space"}[args.what]
    info = upload(
        out,
        args.repo_id,
        repo_type=repo_type,
        revision=args.revision,
        private=args.private,
        message=args.message,
    )
    print(f"committed {info.oid} to {args.repo_id}: {info.commit_url}")
    shutil.rmtree(out, ignore_errors=True)
    return None


if __name__ == "__main__":
    main()
