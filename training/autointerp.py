"""Label every unit of dictionaries (and the MLP-neuron baseline) with an explainer and a judge, and
write the feature-label dataset (`fluxsae.labels`).

    python -m training.autointerp --out runs/labels --work runs/labels_work             # Shapes oracle
    python -m training.autointerp --out runs/labels --work runs/work --explainer http   # FLUXSAE_AUTOINTERP_*
    python -m training.autointerp --out runs/labels --work runs/work --explainer vlm \
        --vlm-model Qwen/Qwen2-VL-2B-Instruct

Per site and method ("sae", "itda", "mlp": the MLP hidden activations of the site's block, image
tokens; "random": random unit directions, the floor) over fresh Shapes generations or a harvest:
1. one streaming pass: FeatureStats, top images per unit and step-half activations
   (`fluxsae.autointerp.examples`), cached in the work folder; over fresh Shapes generations, or over
   a harvest with --acts (`training.autointerp_harvest`);
2. with Shapes scenes, the ground truth: each unit's AUROC for every candidate concept
   (`fluxsae.autointerp.oracle`) and the concept coverage of the method;
3. labelling (`fluxsae.autointerp.run.label_units`): explainer + judge, cached per unit;
4. the dataset: labels + statistics + example references, the images, optionally painted strips.
Killed at any point, the same command continues: the pass is redone only if it did not finish, and
units already labelled are not asked again.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from fluxsae.autointerp import examples as ex
from fluxsae.autointerp.base import ChatExplainer, ChatJudge, Example, UnitExamples
from fluxsae.autointerp.oracle import ShapesOracle, concept_coverage
from fluxsae.autointerp.render import paint, strip
from fluxsae.autointerp.run import label_units
from fluxsae.autointerp.scoring import ChatDetector, detection_trials
from fluxsae.fileio import load_tensors, save_tensors, write_json
from fluxsae.labels import write_labels
from fluxsae.shapes import as_drawn
from fluxsae.shapes.world import Object, Scene
from training import autointerp_dataset as data
from training.cli import add_config_arguments, config_from_args
from training.work import claim

logger = logging.getLogger(__name__)

SITES = ("transformer_blocks.3.image", "single_transformer_blocks.2.image")
NOISE_FILE = "noise.safetensors"
"""The work folder's starting noise of every image [images, tokens, channels] (seed-noise labels)."""
SEED = 13_000_001
"""Scene and noise seed of the packaged labels: no training, harvest or benchmark draws from it."""
Backend = Literal["oracle", "http", "vlm"]


@dataclass
class AutointerpConfig:
    out: str
    """Folder to write the label dataset to (README.md + data/)."""
    work: str
    """Work folder: the pass's cache, the images, the per-unit label cache. Rerun to resume."""
    source: str = "shapes"
    """Where the dictionaries come from: 'shapes', a repo folder or a Hub id."""
    acts: str | None = None
    """A harvest folder to read instead of generating (sae, itda, random; see training.autointerp_harvest)."""
    sites: tuple[str, ...] = SITES
    """Image-stream sites to label."""
    methods: tuple[str, ...] = ("sae", "itda", "mlp")
    """Units to label: sae, itda, mlp (MLP neurons of the site's block), random (random directions)."""
    scenes: int = 200
    """Shapes scenes to generate (image i: scene i of sample_scenes(scenes, seed), noise seed seed + i)."""
    seed: int = SEED
    """Scene seed; image i uses noise seed `seed + i`."""
    batch_size: int = 25
    """Images per pipeline call."""
    explainer: Backend = "oracle"
    """oracle (Shapes ground truth), http (OpenAI-compatible endpoint from FLUXSAE_AUTOINTERP_URL/MODEL/KEY)
    or vlm (a local transformers model, --vlm-model)."""
    judge: Backend | None = None
    """The judge's backend; none: the same as the explainer."""
    vlm_model: str | None = None
    """Hub id or folder of the local vision-language model (explainer or judge 'vlm')."""
    n_positives: int = 5
    """Top images shown to the explainer and judged as positives."""
    n_negatives: int = 5
    """Top images of other units judged as negatives."""
    top_k: int = 10
    """Top images kept per unit in the pass."""
    min_active_tokens: int = 2
    """An image is a top example only if the unit is > 0 on at least this many of its tokens."""
    pass_methods: tuple[str, ...] = ()
    """More methods to accumulate in the pass without labelling them now (e.g. 'random', so that a later
    run with it in --methods finds its pass done and generates nothing)."""
    random_units: int = 2048
    """How many random unit directions the 'random' method draws per site."""
    max_units: int | None = None
    """Label only the first N units of each site and method (quick runs); none: all."""
    max_workers: int = 1
    """Units labelled at once (threads); for HTTP also the cap on requests in flight."""
    detection: int = 4
    """With a chat judge (http, vlm): held-out images per class for each unit's detection and fuzzing
    scores (`fluxsae.autointerp.scoring`), 4 x this many more requests per unit; 0: none."""
    strips: bool = False
    """Also write the 'examples' config: each unit's top images painted, one strip per unit (large)."""


def parse_args(argv=None) -> AutointerpConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, AutointerpConfig)
    cfg = config_from_args(AutointerpConfig, p.parse_args(argv))
    bad = [m for m in (*cfg.methods, *cfg.pass_methods) if m not in ("sae", "itda", "mlp", "random")]
    if bad:
        p.error(f"--methods takes sae, itda, mlp, random; got {bad}")
    if cfg.scenes < 1 or cfg.batch_size < 1 or cfg.top_k < cfg.n_positives:
        p.error("--scenes and --batch-size must be >= 1 and --top-k >= --n-positives")
    return cfg


def scene_of(d: dict) -> Scene:
    return Scene(objects=tuple(Object(**o) for o in d["objects"]), background=d["background"])


# -- 1. the streaming pass -----------------------------------------------------------------------


def missing_jobs(work: Path, cfg: AutointerpConfig) -> list[tuple[str, str]]:
    """(site, method) pairs whose pass has not finished (each summary is written when complete)."""
    methods = dict.fromkeys((*cfg.methods, *cfg.pass_methods))
    return [(s, m) for s in cfg.sites for m in methods if not (work / m / s / ex.SUMMARY_FILE).is_file()]


def streaming_pass(cfg: AutointerpConfig, work: Path, todo: list[tuple[str, str]]) -> None:
    """Generate the Shapes scenes once, feeding the accumulator of every (site, method) of `todo`;
    save their summaries. The same images come out on every run (seeded), so a later run that adds
    a method (e.g. "random") generates them again and labels them alike."""
    import fluxsae
    from fluxsae import shapes
    from fluxsae.feature_stats import fingerprint
    from fluxsae.heatmap import token_grid
    from fluxsae.hub import check_matches_pipeline

    torch.manual_seed(0)
    pipe = fluxsae.load_pipeline("shapes")
    pipe.set_progress_bar_config(disable=True)
    gen = dict(shapes.GENERATION_DEFAULTS)
    steps = list(range(gen["num_inference_steps"]))
    rows, cols = token_grid(pipe, gen["height"], gen["width"])
    jobs = []  # [site, method, units_fn, fingerprint, accumulator]
    for site, method in todo:
        if method in ("sae", "itda"):
            d = fluxsae.load_dictionary(cfg.source, site=site, method=method)
            check_matches_pipeline(d, pipe)
            fn, fp = (lambda a, h, d=d: ex.dictionary_units(d, a)), fingerprint(d)
        elif method == "mlp":
            fn, fp = (lambda a, h, site=site: h[site]), "mlp"
        else:
            r = ex.RandomDirections(cfg.random_units, int(pipe.transformer.inner_dim), seed=cfg.seed)
            fn, fp = (lambda a, h, r=r: r(a)), f"random-{cfg.seed}"
        jobs.append([site, method, fn, fp, None])
    scenes = shapes.sample_scenes(cfg.scenes, seed=cfg.seed)
    (work / "images").mkdir(parents=True, exist_ok=True)
    lines, noise = [], []
    for start in tqdm(range(0, len(scenes), cfg.batch_size), desc="generate + accumulate", unit="batch"):
        chunk = scenes[start : start + cfg.batch_size]
        ids = list(range(start, start + len(chunk)))
        generators = [torch.Generator().manual_seed(cfg.seed + i) for i in ids]
        with torch.no_grad(), contextlib.ExitStack() as stack:
            sites = sorted({s for s, _ in todo})
            acts = stack.enter_context(fluxsae.capture(pipe, sites)) if sites else {}
            mlp_sites = sorted({s for s, m in todo if m == "mlp"})
            mlp = stack.enter_context(ex.capture_mlp(pipe, mlp_sites, rows * cols))
            starts = stack.enter_context(ex.capture_noise(pipe))
            images = pipe([shapes.caption(s) for s in chunk], generator=generators, **gen).images
        noise.append(torch.cat(starts))
        hidden = {s: ex.stack_steps(calls, len(steps)) for s, calls in mlp.items()}
        for job in jobs:
            site, method, fn, fp, acc = job
            units = fn(acts[site], hidden)
            if acc is None:
                job[4] = acc = ex.UnitAccumulator(site, method, units.shape[-1], steps, k=cfg.top_k,
                                                  min_active_tokens=cfg.min_active_tokens, fingerprint=fp)
            acc.update(units, ids)
        for i, scene, image in zip(ids, chunk, images, strict=True):
            image.save(work / "images" / f"{i:06d}.png")
            lines.append({"image_id": i, "prompt": shapes.caption(scene), "seed": cfg.seed + i,
                          "scene": dataclasses.asdict(scene)})  # fmt: skip
    meta = {"n_images": len(scenes), "scene_seed": cfg.seed, "generation": gen, "cfg_pass": "cond"}
    for site, method, _, _, acc in jobs:
        folder = work / method / site
        folder.mkdir(parents=True, exist_ok=True)
        acc.result(meta).save(folder)
    save_tensors(work / NOISE_FILE, {"noise": torch.cat(noise)}, {"scene_seed": cfg.seed})
    write_json(work / "images.json", lines)


# -- 2. labelling --------------------------------------------------------------------------------


def make_backends(cfg: AutointerpConfig, oracle: ShapesOracle | None):
    def one(kind: str):
        if kind == "oracle":
            if oracle is None:
                raise SystemExit("the oracle needs Shapes scenes (fresh generations or a Shapes harvest)")
            return oracle
        if kind == "http":
            from fluxsae.autointerp.http import HttpChat

            return HttpChat(max_concurrency=max(1, cfg.max_workers))
        if not cfg.vlm_model:
            raise SystemExit("--explainer/--judge vlm needs --vlm-model (a Hub id or a local folder)")
        from fluxsae.autointerp.vlm import TransformersVLM

        return TransformersVLM(cfg.vlm_model)

    explainer_backend = one(cfg.explainer)
    judge_kind = cfg.judge or cfg.explainer
    judge_backend = explainer_backend if judge_kind == cfg.explainer else one(judge_kind)
    explainer = explainer_backend if cfg.explainer == "oracle" else ChatExplainer(explainer_backend)
    judge = judge_backend if judge_kind == "oracle" else ChatJudge(judge_backend)
    detector = ChatDetector(judge_backend) if judge_kind != "oracle" and cfg.detection > 0 else None
    return explainer, judge, detector


def unit_examples(summary: ex.UnitSummary, images: dict, scenes: dict, grid: tuple[int, int], n: int,
                  trials: int = 0, n_positives: int = 5, seed: int = 0):  # fmt: skip
    """UnitExamples of every unit: its top images (at most n), painted on one scale per unit; with
    `trials`, that many held-out images per class for a detection scorer (`scoring.detection_trials`):
    images beyond its first `n_positives`, near misses from the top images of the 3 units whose peak per
    image correlates most with its own."""
    out = []
    maps = peaks = similar = None
    if trials:
        maps = summary.half_acts.float().mean(0)  # [images, tokens, U]
        peaks = maps.amax(1)  # [images, U]
        centred = torch.nn.functional.normalize(peaks - peaks.mean(0), dim=0)
        similar = (centred.T @ centred).fill_diagonal_(-2).topk(3, dim=1).indices  # [U, 3]
        row = {int(i): k for k, i in enumerate(summary.image_ids.tolist())}  # image id -> row of maps
    for u in range(summary.n_units):
        ids = [int(i) for i in summary.top_ids[u] if i >= 0][:n]
        vmax = float(summary.top_scores[u, 0]) if ids else 0.0
        examples = tuple(
            Example(images[i], summary.top_maps[u, j].numpy().reshape(grid), vmax, i, scenes.get(i))
            for j, i in enumerate(ids)
        )
        held_out = ()
        if trials and ids:
            near = [int(i) for v in similar[u].tolist() for i in summary.top_ids[v] if i >= 0]
            fires = dict(zip(row, (peaks[list(row.values()), u] > 0).tolist(), strict=True))
            map_of = lambda i, u=u: maps[row[i], :, u].numpy().reshape(grid)  # noqa: E731
            held_out = detection_trials(u, fires, map_of, images, scenes, ids[:n_positives], near, n=trials,
                                        seed=seed)  # fmt: skip
        out.append(UnitExamples(summary.site, summary.method, u, examples, held_out))
    return out


def _check_fingerprint(cfg: AutointerpConfig, summary: ex.UnitSummary, work: Path) -> None:
    """Refuse a work folder whose pass saw other dictionary weights (retrained since): its top images,
    statistics and AUROCs would belong to the old features."""
    if summary.method not in ("sae", "itda"):
        return
    import fluxsae
    from fluxsae.feature_stats import fingerprint

    d = fluxsae.load_dictionary(cfg.source, site=summary.site, method=summary.method)
    if summary.stats.meta.get("fingerprint") != fingerprint(d):
        raise SystemExit(
            f"{work / summary.method / summary.site} was computed for other {summary.method} weights than "
            f"{cfg.source}'s (retrained since?): pass a new --work, or delete that folder to redo its pass."
        )


def load_work(work: Path) -> tuple[list[dict], dict, dict, torch.Tensor | None]:
    """(images.json lines, image_id -> PIL image, image_id -> scene as drawn, starting noise or None).

    A scene is placed where its image shows its objects (`fluxsae.shapes.as_drawn`); without its image
    (a harvest keeps only the top examples' images) it keeps the sampled placement."""
    lines = json.loads((work / "images.json").read_text())
    images = {r["image_id"]: Image.open(work / "images" / f"{r['image_id']:06d}.png").convert("RGB")
              for r in lines if r.get("has_image", True)}  # fmt: skip
    scenes = {}
    for r in lines:
        if r.get("scene"):
            scene = scene_of(r["scene"])
            image = images.get(r["image_id"])
            scenes[r["image_id"]] = as_drawn(scene, image)[0] if image is not None else scene
    noise = load_tensors(work / NOISE_FILE)[0]["noise"] if (work / NOISE_FILE).is_file() else None
    return lines, images, scenes, noise


def label_site(cfg: AutointerpConfig, work: Path, site: str, method: str, images, scenes, noise):
    """Label every unit of one site and method -> (dataset rows, detection rows, summary, UnitExamples)."""
    summary = ex.UnitSummary.load(work / method / site)
    _check_fingerprint(cfg, summary, work)
    ids = [int(i) for i in summary.image_ids]
    ordered = [scenes[i] for i in ids] if all(i in scenes for i in ids) else None
    oracle = coverage = None
    if ordered is not None:
        kept = noise[torch.tensor(ids)] if noise is not None and len(noise) > max(ids) else None
        if kept is None:
            logger.warning("no starting noise in %s: the seed-noise explanation is left out", work)
        oracle = ShapesOracle.fit(summary.half_acts, ordered, noise=kept)
        coverage = concept_coverage(summary.half_acts.float().mean(0), ordered)
    explainer, judge, detector = make_backends(cfg, oracle)
    grid = (int(np.sqrt(summary.top_maps.shape[2])),) * 2
    units = unit_examples(summary, images, scenes, grid, cfg.top_k, cfg.detection if detector else 0,
                          cfg.n_positives, cfg.seed)[: cfg.max_units]  # fmt: skip
    start = time.perf_counter()
    with tqdm(total=len(units), desc=f"label {method} {site}", unit="unit") as bar:
        records = label_units(units, explainer, judge, work / method / site / "labels.jsonl",
                              n_positives=cfg.n_positives, n_negatives=cfg.n_negatives,
                              max_workers=cfg.max_workers, seed=cfg.seed, progress=lambda r: bar.update(),
                              detector=detector)  # fmt: skip
    seconds = time.perf_counter() - start
    rows = [data.dataset_row(r, summary, oracle, cfg.n_positives) for r in records]
    groups = None
    if method == "sae":
        import fluxsae

        groups = data.groups_of(summary.n_units, fluxsae.load_sae(cfg.source, site=site).cfg.matryoshka)
    detections = data.detection_rows(summary, oracle) if oracle is not None else []
    return rows, detections, data.summarise(rows, coverage, seconds, groups), units


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    work = Path(cfg.work)
    # What the pass depends on; sites and methods may be added to a work folder later.
    pass_settings = {k: getattr(cfg, k) for k in ("source", "acts", "scenes", "seed", "top_k",
                                                  "min_active_tokens", "random_units")}  # fmt: skip
    claim(work, "autointerp.json", pass_settings, what="an autointerp run")
    todo = missing_jobs(work, cfg)
    if todo or not (work / "images.json").is_file():
        if cfg.acts:
            from training.autointerp_harvest import harvest_pass

            harvest_pass(cfg, work, todo)
        else:
            streaming_pass(cfg, work, todo)
    lines, images, scenes, noise = load_work(work)
    rows_all, detections, strips, summaries = [], [], [], {}
    for site in cfg.sites:
        for method in cfg.methods:
            rows, found, summaries[f"{method}/{site}"], units = label_site(cfg, work, site, method, images,
                                                                           scenes, noise)  # fmt: skip
            rows_all += rows
            detections += found
            if cfg.strips:
                for unit, row in zip(units, rows, strict=False):
                    if unit.examples:
                        shown = unit.examples[: cfg.n_positives]
                        painted = [paint(e.image, e.acts, e.vmax, size=128) for e in shown]
                        strips.append({"site": site, "method": method, "feature": unit.feature,
                                       "label": row["label"], "score": row["score"], "image": strip(painted)})
    image_rows = [{"image_id": r["image_id"], "prompt": r["prompt"], "seed": r["seed"],
                   "scene": json.dumps(r["scene"]) if r.get("scene") else None,
                   "image": images[r["image_id"]]} for r in lines if r["image_id"] in images]  # fmt: skip
    write_labels(cfg.out, rows_all, image_rows, examples=strips or None, detections=detections or None,
                 body=data.card_body(summaries, cfg),
                 base_model=None if cfg.source == "shapes" else cfg.source)  # fmt: skip
    write_json(work / "summary.json", summaries)
    brief = {k: {f: v for f, v in s.items() if f not in ("best", "groups")} for k, s in summaries.items()}
    print(json.dumps(brief, indent=1))
    return summaries


if __name__ == "__main__":
    main()
