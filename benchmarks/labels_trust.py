"""Labels a user can trust, checked on Shapes scenes no label run saw.

1. Truth: where the model draws an object inside its caption's cell, against the placement that was
   sampled for the caption (token masks of both; `fluxsae.shapes.as_drawn`).
2. Honest labels: every packaged label (SAE, ITDA, MLP neurons at both packaged sites) read on the fresh
   scenes at its own threshold: its precision (>= 0.8 targeted), recall and F1; the share of live units
   whose label keeps F1 >= 0.5, per Matryoshka group.
3. Explained units, method against method: the Shapes oracle fitted on the fresh scenes (labels chosen
   on the even ones, figures on the odd ones) for SAE features, ITDA atoms, MLP neurons and 2,048 random
   directions (the floor), per Matryoshka group.
4. Search: the app's own /search (gradio_client against the launched app) for 12 words (6 colours, 3
   shapes, 3 backgrounds) at both sites; the first SAE feature's AUROC for the word's concept on the
   fresh scenes (sampled-placement masks, as `fluxsae.shapes.truth` has always scored, and drawn ones).
5. The rare features: the same scenes again with other noise seeds; how often a feature fires again on
   the same token (against its density), per group.

    python benchmarks/labels_trust.py                     # ~15 min on 2 cores
    python benchmarks/labels_trust.py --labels runs/labels --out runs/labels_trust.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

import fluxsae
from fluxsae import shapes
from fluxsae.autointerp.concepts import Concept
from fluxsae.autointerp.detection import Detector
from fluxsae.autointerp.examples import (
    RandomDirections,
    capture_mlp,
    capture_noise,
    dictionary_units,
    stack_steps,
)
from fluxsae.shapes import truth

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shapes_activations import command_line, write_report  # noqa: E402

from training.autointerp_dataset import explained, groups_of  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "labels_trust.json"
SITES = ("transformer_blocks.3.image", "single_transformer_blocks.2.image")
WORDS = {
    **{c: f"color:{c}" for c in shapes.COLORS},
    **{s: f"shape:{s}" for s in shapes.SHAPES},
    **{f"{b} background": f"background:{b}" for b in shapes.BACKGROUNDS},
}


def generate(scenes, seed: int, offset: int = 0, batch: int = 25) -> dict:
    """Activations [steps, n, 64, d] of both sites, MLP hidden units, starting noise, images (noise seed
    seed + offset + i for scene i)."""
    pipe = fluxsae.load_pipeline("shapes")
    pipe.set_progress_bar_config(disable=True)
    n_steps = shapes.GENERATION_DEFAULTS["num_inference_steps"]
    out: dict = {"images": [], "noise": [], **{s: [] for s in SITES}, **{f"mlp:{s}": [] for s in SITES}}
    for i in range(0, len(scenes), batch):
        chunk = scenes[i : i + batch]
        generators = [torch.Generator().manual_seed(seed + offset + i + j) for j in range(len(chunk))]
        with (
            torch.no_grad(),
            fluxsae.capture(pipe, list(SITES)) as acts,
            capture_mlp(pipe, SITES, truth.N_TOKENS) as hidden,
            capture_noise(pipe) as noise,
        ):
            images = pipe(
                [shapes.caption(s) for s in chunk], generator=generators, **shapes.GENERATION_DEFAULTS
            ).images
        out["images"] += images
        out["noise"].append(torch.cat(noise))
        for site in SITES:
            out[site].append(acts[site].float())
            out[f"mlp:{site}"].append(stack_steps(hidden[site], n_steps))
    return {k: v if k == "images" else torch.cat(v, dim=1 if k != "noise" else 0) for k, v in out.items()}


def halves(units: torch.Tensor) -> torch.Tensor:
    """[steps, n, 64, U] -> [2, n, 64, U]: the mean over the early and over the late half of the steps."""
    half = (units.shape[0] + 1) // 2
    return torch.stack([units[:half].mean(0), units[half:].mean(0)])


def units_of(method: str, site: str, data: dict, d_in: int) -> torch.Tensor:
    if method == "mlp":
        return data[f"mlp:{site}"]
    if method == "random":
        return RandomDirections(2048, d_in, seed=13_000_001)(data[site])
    return dictionary_units(fluxsae.load_dictionary("shapes", site=site, method=method), data[site])


def fresh_figures(row: dict, half: torch.Tensor, scenes, noise: torch.Tensor) -> dict | None:
    """A label's precision, recall and F1 on the fresh scenes, at its own activation level."""
    unit = half[..., row["feature"]]  # [2, n, 64]
    fires = unit > max(float(row["fires_above"] or 0), 0.0)
    fires &= unit > 0
    if str(row["concept"]).startswith("noise"):
        rule = torch.tensor(row["noise_rule"])
        where = (noise @ rule[:-1] > rule[-1]).numpy()  # [n, 64]
        scope = row["concept"].partition("@")[2] or "all"
    else:
        concept = Concept.from_key(row["concept"])
        where, scope = concept.masks(scenes), concept.scope
    target = np.stack([where & (scope != "late"), where & (scope != "early")])
    tp, n_fired, n_concept = int((fires.numpy() & target).sum()), int(fires.sum()), int(target.sum())
    if not n_fired:
        return None
    return {
        "precision": tp / n_fired,
        "recall": tp / max(n_concept, 1),
        "f1": 2 * tp / (n_fired + n_concept),
        "n_fired": n_fired,
    }


def honest_labels(labels_source: str, data: dict, drawn) -> dict:
    """Section 2: each packaged label on the fresh scenes."""
    out = {}
    for site in SITES:
        for method in ("sae", "itda", "mlp"):
            rows = [dict(r) for r in fluxsae.load_labels(labels_source, site=site, method=method)]
            half = halves(units_of(method, site, data, data[site].shape[-1]))
            checked = []
            for row in rows:
                fresh = fresh_figures(row, half, drawn, data["noise"]) if row["status"] == "ok" else None
                checked.append({**row, "fresh": fresh})
            labelled = [r for r in checked if r["status"] == "ok"]
            precise = [r["fresh"]["precision"] >= 0.8 for r in labelled if r["fresh"]]
            by_fresh = [
                {
                    **r,
                    "status": r["status"],
                    "f1": (r["fresh"] or {}).get("f1", 0.0) if r["status"] == "ok" else None,
                }
                for r in checked
            ]
            entry = {
                "labels": len(labelled),
                "fired_on_fresh": len(precise),
                "share_precision_ge_0.8": float(np.mean(precise)) if precise else None,
                "median_precision": float(
                    np.median([r["fresh"]["precision"] for r in labelled if r["fresh"]])
                ),
                "median_recall": float(np.median([r["fresh"]["recall"] for r in labelled if r["fresh"]])),
                "dataset_median_precision": float(np.median([r["precision"] for r in labelled])),
                "explained": explained(by_fresh),
            }
            if method == "sae":
                prefixes = fluxsae.load_sae("shapes", site=site).cfg.matryoshka
                entry["groups"] = {
                    f"{a}-{b}": explained(by_fresh[a:b]) for a, b in groups_of(len(rows), prefixes)
                }
            out[f"{method}/{site}"] = entry
            print(
                f"labels {method:5s} {site:34s} precision >= 0.8: {entry['share_precision_ge_0.8']:.3f} "
                f"median P {entry['median_precision']:.2f} R {entry['median_recall']:.2f}",
                flush=True,
            )
    return out


def method_against_method(data: dict, drawn) -> dict:
    """Section 3: the oracle fitted on the fresh scenes for every method, the random floor included."""
    out = {}
    for site in SITES:
        for method in ("sae", "itda", "mlp", "random"):
            half = halves(units_of(method, site, data, data[site].shape[-1]))
            det = Detector(half, drawn, noise=data["noise"])
            rows = []
            for u in range(half.shape[-1]):
                lab = det.label(u)
                figures = lab.held_out.as_dict() if lab.held_out is not None else {}
                rows.append({"status": lab.status, "concept": lab.concept, **figures})
            entry = {"all": explained(rows)}
            if method == "sae":
                prefixes = fluxsae.load_sae("shapes", site=site).cfg.matryoshka
                entry["groups"] = {
                    f"{a}-{b}": explained(rows[a:b]) for a, b in groups_of(len(rows), prefixes)
                }
            out[f"{method}/{site}"] = entry
            print(f"explained {method:6s} {site:34s} {entry['all']}", flush=True)
    return out


def search_through_the_app(data: dict, scenes, drawn, labels_source: str) -> dict:
    """Section 4: /search of the launched app, then the first SAE feature's AUROC on fresh scenes."""
    from gradio_client import Client

    import app

    pipe = fluxsae.load_pipeline("shapes")
    demo = app.build_demo(pipe, "shapes", labels=labels_source)
    demo.queue().launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    out = {}
    try:
        client = Client(demo.local_url, verbose=False)
        for site in SITES:
            units = units_of("sae", site, data, data[site].shape[-1]).mean(0)  # [n, 64, F]
            keys = list(WORDS.values())
            sampled, _ = truth.concept_auroc(units, scenes, keys)
            placed, _ = truth.concept_auroc(units, drawn, keys)
            rows = {}
            for j, word in enumerate(WORDS):
                found = client.predict(word, site, "SAE", api_name="/search")
                first = found["data"][0]
                f = int(first[0])
                rows[word] = {
                    "feature": f,
                    "shown": first[1],
                    "f1": first[2],
                    "auroc": float(sampled[f, j]),
                    "auroc_drawn": float(placed[f, j]),
                    "best_any_unit": float(sampled[:, j].nan_to_num(0).max()),
                }
                print(
                    f"search {site:34s} {word:18s} -> {f:5d} {first[1]!r:36s} AUROC {sampled[f, j]:.3f}",
                    flush=True,
                )
            values = [r["auroc"] for r in rows.values()]
            out[site] = {
                "words": rows,
                "median_auroc": float(np.median(values)),
                "min_auroc": min(values),
                "share_ge_0.9": float(np.mean([v >= 0.9 for v in values])),
                "ranked_by": found["headers"][2],
            }
    finally:
        demo.close()
    return out


def placement(scenes, drawn) -> dict:
    """Section 1: token masks of the sampled and of the drawn placement, per object."""
    ious, shifts, missing = [], [], 0
    for asked, seen in zip(scenes, drawn, strict=True):
        for a, b in zip(asked.objects, seen.objects, strict=True):
            if (a.x, a.y) == (b.x, b.y):
                missing += 1
                continue
            ma = Concept(("object",)).masks([shapes.Scene((a,), asked.background)])[0]
            mb = Concept(("object",)).masks([shapes.Scene((b,), asked.background)])[0]
            ious.append((ma & mb).sum() / max((ma | mb).sum(), 1))
            shifts.append(float(np.hypot(a.x - b.x, a.y - b.y)))
    return {
        "objects": len(ious) + missing,
        "not_found_in_image": missing,
        "median_token_iou_sampled_vs_drawn": float(np.median(ious)),
        "median_centroid_shift_px": float(np.median(shifts)),
        "p90_centroid_shift_px": float(np.percentile(shifts, 90)),
    }


def seed_consistency(data: dict, scenes, seed: int, n: int) -> dict:
    """Section 5: the first n scenes again with other noise; P(fires again on the same token | fired)."""
    again = generate(scenes[:n], seed, offset=1_000_000)
    out = {}
    for site in SITES:
        sae = fluxsae.load_sae("shapes", site=site)
        first = dictionary_units(sae, data[site][:, :n]).mean(0) > 0
        second = dictionary_units(sae, again[site]).mean(0) > 0
        fired = first.sum((0, 1)).float()
        both = (first & second).sum((0, 1)).float()
        density = second.float().mean((0, 1))
        groups = {}
        for a, b in groups_of(first.shape[-1], sae.cfg.matryoshka):
            units = torch.arange(a, b)[fired[a:b] >= 10]
            if len(units):
                groups[f"{a}-{b}"] = {
                    "units": len(units),
                    "median_fires_again": float((both / fired)[units].median()),
                    "median_density": float(density[units].median()),
                }
        out[site] = groups
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", default="shapes", help="the label dataset: 'shapes' (packaged) or a folder")
    p.add_argument("--scenes", type=int, default=200)
    p.add_argument("--seed", type=int, default=4242, help="scene and noise seed (no label run uses it)")
    p.add_argument("--reseeded", type=int, default=100, help="scenes generated again for section 5")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    scenes = shapes.sample_scenes(args.scenes, seed=args.seed)
    data = generate(scenes, args.seed)
    drawn = [shapes.as_drawn(s, im)[0] for s, im in zip(scenes, data["images"], strict=True)]
    report = {
        "scenes": args.scenes,
        "seed": args.seed,
        "labels": args.labels,
        "placement": placement(scenes, drawn),
        "honest_labels": honest_labels(args.labels, data, drawn),
        "search": search_through_the_app(data, scenes, drawn, args.labels),
        "explained": method_against_method(data, drawn),
        "seed_consistency": seed_consistency(data, scenes, args.seed, args.reseeded),
    }
    return write_report(args.out, command_line(__file__, argv), report)


if __name__ == "__main__":
    main()
