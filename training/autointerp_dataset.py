"""The rows, the detection table and the card of a feature-label dataset (`fluxsae.labels`), from what
`training.autointerp` computed: each unit's record (label, reference score, chat detection scores), its
statistics and top examples, and, where the truth is known, the Shapes oracle's detection figures."""

from __future__ import annotations

import numpy as np
import torch

from fluxsae.autointerp import examples as ex
from fluxsae.autointerp.concepts import SCOPES, Concept
from fluxsae.autointerp.oracle import ShapesOracle
from fluxsae.shapes.world import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES

SEARCH_CONCEPTS = (
    "object", *(f"color:{c}" for c in COLORS), *(f"shape:{s}" for s in SHAPES), *(f"size:{s}" for s in SIZES),
    *(f"background:{b}" for b in BACKGROUNDS), *(f"position:{p}" for p in POSITIONS),
)  # fmt: skip
"""Concepts whose best units (over all steps, the early ones, the late ones) the detection table lists
whatever the units' own labels: the words a person searches for ("red", "circle", "gray background")."""
TOP_UNITS = 20
"""Units listed per search concept."""
CANDIDATES = 5
"""Each unit's best concepts listed, besides its label."""


def dataset_row(record: dict, summary: ex.UnitSummary, oracle: ShapesOracle | None, n: int) -> dict:
    """One row of the "labels" config: the record, the oracle's held-out figures, statistics, examples."""
    u = record["feature"]
    ids = [int(i) for i in summary.top_ids[u] if i >= 0][:n]
    scale = float(summary.top_scores[u, 0]) if ids else 0.0
    maps = summary.top_maps[u, : len(ids)].clamp(min=0) / scale if scale > 0 else summary.top_maps[u, :0]
    stats = summary.stats
    row = {
        **record, "density": float(stats.density[u]),
        "max_activation": float(stats.max_activation[u]), "mean_activation": float(stats.mean_when_active[u]),
        "timestep_profile": stats.timestep_profile[:, u].tolist(), "example_images": ids,
        "example_activations": summary.top_scores[u, : len(ids)].tolist(),
        "example_maps": (maps * 255).round().clamp(0, 255).to(torch.uint8).tolist(), "example_scale": scale,
    }  # fmt: skip
    if oracle is not None:
        label = oracle.label_of(u)
        if record.get("explainer") == oracle.name:
            cached = (record["label"], record["status"])
            if record["status"] != "no_examples" and cached != (label.text, label.status):
                where = f"{summary.site} ({summary.method})"
                raise SystemExit(
                    f"The label cache of {where} holds {record['label']!r} for unit {u}, the oracle now "
                    f"says {label.text!r}: an earlier rule made it; delete that labels.jsonl."
                )
            # Units with too few active tokens for a top image still have detection figures.
            row.update(label=label.text, concept=label.concept, status=label.status)
        row["auroc"] = oracle.auroc_of(u)
        if label.held_out is not None:
            row.update(label.held_out.as_dict(), threshold=label.threshold, fires_above=label.level)
        row["noise_rule"] = list(label.noise_rule) if label.noise_rule else None
    return row


def detection_rows(summary: ex.UnitSummary, oracle: ShapesOracle) -> list[dict]:
    """Rows of the "detections" config: how well units detect concepts (held-out figures), for each unit
    its best CANDIDATES concepts, and for each of SEARCH_CONCEPTS its TOP_UNITS best units."""
    detector = oracle.detector
    density = summary.stats.density
    rows: dict[tuple[int, str], dict] = {}

    def add(unit: int, key: str, threshold: float, figures) -> None:
        rows.setdefault((unit, key), {
            "site": summary.site, "method": summary.method, "feature": unit, "concept": key,
            "text": Concept.from_key(key).text, "threshold": threshold, **figures.as_dict(),
            "density": float(density[unit]),
        })  # fmt: skip

    for unit in torch.nonzero(detector.live).flatten().tolist():
        for key, threshold, figures in detector.candidates(unit, CANDIDATES):
            add(unit, key, threshold, figures)
    for key in SEARCH_CONCEPTS:
        for scope in SCOPES:  # a unit that detects "blue" on the early steps only is a blue detector too
            scoped = key if scope == "all" else f"{key}@{scope}"
            for unit, threshold, figures in detector.top_units(scoped, TOP_UNITS):
                if figures.n_fired:
                    add(unit, scoped, threshold, figures)
    return list(rows.values())


def groups_of(n_units: int, prefixes) -> list[tuple[int, int]]:
    """The unit ranges of a Matryoshka dictionary's groups (prefix sizes, e.g. [4, 16, 128, 512]), the
    last group running to `n_units`; one group without prefixes."""
    bounds = [0, *(int(p) for p in prefixes or ()), n_units]
    return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def explained(rows: list[dict]) -> dict:
    """Among the live units of `rows` (those that fire): how many carry a label, and a label with
    held-out F1 >= 0.5; the median figures of the labels."""
    live = [r for r in rows if r["status"] != "no_examples"]
    labelled = [r for r in live if r["status"] == "ok"]
    good = [r for r in labelled if (r.get("f1") or 0) >= 0.5]
    share = lambda part: round(len(part) / len(live), 3) if live else None  # noqa: E731
    return {
        "units": len(rows), "live": len(live), "labelled": share(labelled), "f1_ge_0.5": share(good),
        "unexplained": sum(r["status"] == "unexplained" for r in live),
        "median_precision": _median([r.get("precision") for r in labelled]),
        "median_recall": _median([r.get("recall") for r in labelled]),
        "median_f1": _median([r.get("f1") for r in labelled]),
        "noise_labels": sum(str(r.get("concept") or "").startswith("noise") for r in labelled),
    }  # fmt: skip


def summarise(rows: list[dict], coverage: dict | None, seconds: float, groups=None) -> dict:
    """The figures of one site and method for the card and summary.json."""
    scores = np.array([r["score"] for r in rows if r["score"] is not None], dtype=float)
    aurocs = np.array([r["auroc"] for r in rows if r.get("auroc") is not None], dtype=float)
    detection = [r["detection"] for r in rows if r.get("detection") is not None]
    out = {
        "units": len(rows), "scored": int(scores.size),
        "median_score": float(np.median(scores)) if scores.size else None,
        "share_score_ge_0.8": float((scores >= 0.8).mean()) if scores.size else None,
        "median_label_auroc": float(np.median(aurocs)) if aurocs.size else None,
        "statuses": {s: sum(r["status"] == s for r in rows) for s in sorted({r["status"] for r in rows})},
        "explained": explained(rows),
        "median_detection": _median(detection), "median_fuzzing": _median([r.get("fuzzing") for r in rows]),
        "requests_per_unit": float(np.mean([r["requests"] for r in rows])) if rows else 0.0,
        "label_seconds": round(seconds, 2),
        "units_per_minute": round(len(rows) / seconds * 60, 1) if seconds > 0 else None,
    }  # fmt: skip
    if groups and len(groups) > 1:
        out["groups"] = {f"{a}-{b}": explained(rows[a:b]) for a, b in groups}
    if coverage is not None:
        out["coverage"] = coverage["coverage"]
        out["median_best_auroc"] = coverage["median_best_auroc"]
        out["best"] = {c: [u, round(a, 4)] for c, (u, a) in coverage["best"].items()}
    return out


def _f(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def card_body(summaries: dict, cfg) -> str:
    """The dataset card's markdown: how the labels were made, and what they are worth, per site and method."""
    judge = cfg.judge or cfg.explainer
    lines = [
        "# fluxsae feature labels",
        "",
        f"Dictionaries: `{cfg.source}`; {cfg.scenes} fresh Shapes scenes (seed {cfg.seed}), all steps; "
        f"explainer `{cfg.explainer}`, judge `{judge}`. Made by `python -m training.autointerp` "
        "(the packaged Shapes labels: `python -m training.shapes_labels`).",
        "",
        "One row per unit (SAE feature, ITDA atom, MLP neuron): its label and how well the unit detects "
        "it. Where the truth is known (the Shapes oracle), a label is the concept the unit detects with "
        "token precision >= 0.8 (80% of where it fires shows the concept) on the scenes it was chosen on "
        "and on held-out ones, there at its one-sided 95% lower bound (Wilson), so that labels keep "
        "their precision on scenes no label run saw; `precision`, `recall` and `f1` are the held-out "
        "figures. A unit with no "
        "such concept is `unexplained`, never given the nearest wrong label. `score` is the reference "
        "work's score (5 top images + 5 top images of other units, judged one by one, mean of s / 1 - s), "
        "kept for comparison: it rewards any unit whose top images show the concept, however little of "
        "it the unit covers.",
        "",
    ]
    header = ["site", "method", "units", "live", "labelled", "label F1 >= 0.5", "unexplained",
              "median precision", "median recall", "median F1", "median score",
              "median detection"]  # fmt: skip
    rows = []
    for key, s in summaries.items():
        method, site = key.split("/", 1)
        e = s["explained"]
        rows.append([site, method, str(s["units"]), str(e["live"]), _f(e["labelled"]), _f(e["f1_ge_0.5"]),
                     str(e["unexplained"]), _f(e["median_precision"]), _f(e["median_recall"]),
                     _f(e["median_f1"]), _f(s["median_score"]), _f(s.get("median_detection"))])  # fmt: skip
    lines += _table(header, rows)
    grouped = [(k, s) for k, s in summaries.items() if s.get("groups")]
    if grouped:
        lines += ["", "Per Matryoshka group (the first groups hold the general features): the share of live "
                  "units that carry a label, and a label with held-out F1 >= 0.5.", ""]  # fmt: skip
        rows = [[*key.split("/", 1)[::-1], group, str(e["live"]), _f(e["labelled"]), _f(e["f1_ge_0.5"])]
                for key, s in grouped for group, e in s["groups"].items()]  # fmt: skip
        lines += _table(["site", "method", "group", "live", "labelled", "label F1 >= 0.5"], rows)
    return "\n".join(lines)
