"""Autointerp on the packaged Shapes model: the reference work's score with the Shapes oracle as
explainer and judge, per method and site, against 2,048 random unit directions as a floor; concept
coverage; throughput of the oracle on CPU and the HTTP path's requests per feature.

    python -m training.shapes_labels --work runs/shapes_labels     # the pass (also used for the package)
    python -m benchmarks.autointerp --work runs/shapes_labels      # -> benchmarks/results/autointerp*

Reads the pass that `training.shapes_labels` left in its work folder (200 fresh scenes; SAE, ITDA,
MLP neurons and 2,048 random directions per site), labels every unit again into a fresh cache (so the
time is a cold run: the oracle's AUROC fit plus 5 + 5 judgements per unit), and writes
autointerp.json, autointerp_scores.png (histograms) and autointerp_coverage.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fluxsae.autointerp import ChatExplainer, ChatJudge, HttpChat, label_units
from fluxsae.autointerp import examples as ex
from fluxsae.autointerp.loopback import LoopbackChat, Reply, answer
from fluxsae.autointerp.oracle import SINGLE_CONCEPTS, ShapesOracle, concept_coverage
from fluxsae.autointerp.scoring import ChatDetector
from training.autointerp import SEED, SITES, load_work, unit_examples
from training.autointerp_dataset import dataset_row, summarise

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("sae", "itda", "mlp", "random")
KNOWN = {  # independent code, 200 scenes, activations averaged over steps, best single unit per concept
    "median_best_auroc": {"sae": (0.81, 0.73), "itda": (0.60, 0.60), "mlp": (0.90, 0.87)},
    "coverage": {"sae": (0.20, 0.0), "mlp": (0.47, 0.0)},
}


def http_requests_per_unit(units, n_units: int = 20, rate_limit_every: int = 20) -> dict:
    """Label `n_units` units through the HTTP backend against a loopback server that answers in the
    expected format and refuses every `rate_limit_every`-th request with a 429."""

    def script(body, n):
        if n % rate_limit_every == 0:
            return Reply(429, "rate limited", {"Retry-After": "0"})
        text = next(p["text"] for p in body["messages"][0]["content"] if p["type"] == "text")
        if "ANSWER:" in text:
            return answer("ANSWER: YES")
        return answer("PATTERN: red object" if "PATTERN" in text else "SCORE: 0.5")

    with tempfile.TemporaryDirectory() as tmp, LoopbackChat(script) as server:
        chat = HttpChat(url=server.url, model="loopback", backoff=0.001, max_concurrency=4)
        start = time.perf_counter()
        records = label_units(units[:n_units], ChatExplainer(chat), ChatJudge(chat), Path(tmp) / "c.jsonl",
                              max_workers=4, detector=ChatDetector(chat))  # fmt: skip
        seconds = time.perf_counter() - start
    return {"units": len(records), "requests_per_unit": float(np.mean([r["requests"] for r in records])),
            "protocol_requests_per_unit": 1 + 5 + 5 + 4 * 4, "rate_limited_share": 1 / rate_limit_every,
            "seconds_loopback": round(seconds, 2)}  # fmt: skip


def plot_scores(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(SITES), 3, figsize=(12, 3.2 * len(SITES)), sharex=True)
    bins = np.linspace(0, 1, 26)
    for row, site in enumerate(SITES):
        floor = results[f"random/{site}"]["scores"]
        for col, method in enumerate(("sae", "itda", "mlp")):
            ax = axes[row, col]
            r = results[f"{method}/{site}"]
            floor_label = f"random (median {np.median(floor):.2f})"
            ax.hist(floor, bins=bins, density=True, color="0.8", label=floor_label)
            ax.hist(r["scores"], bins=bins, density=True, histtype="step", lw=2,
                    label=f"{method} (median {r['median_score']:.2f}, >=0.8: {r['share_score_ge_0.8']:.0%})")
            ax.set_title(f"{method} @ {site}", fontsize=9)
            ax.legend(fontsize=7, loc="upper left")
            if row == len(SITES) - 1:
                ax.set_xlabel("score (oracle; 5 positives + 5 negatives)")
    fig.suptitle("Per-unit autointerp scores on the Shapes model (grey: 2,048 random unit directions)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_coverage(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SITES), figsize=(13, 3.8), sharey=True)
    x = np.arange(len(SINGLE_CONCEPTS))
    for ax, site in zip(axes, SITES, strict=True):
        for i, method in enumerate(METHODS):
            best = results[f"{method}/{site}"]["best"]
            ax.bar(x + (i - 1.5) * 0.2, [best[c][1] for c in SINGLE_CONCEPTS], 0.2, label=method)
        ax.axhline(0.9, color="k", lw=0.8, ls="--")
        ax.set_xticks(x, [c.split(":")[-1] for c in SINGLE_CONCEPTS], rotation=60, fontsize=8)
        ax.set_ylim(0.4, 1.0)
        ax.set_title(f"best single unit per concept @ {site}", fontsize=9)
    axes[0].set_ylabel("AUROC (steps averaged)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/shapes_labels", help="the work folder of training.shapes_labels")
    p.add_argument("--out", default=str(RESULTS), help="where autointerp*.json/png go")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the oracle is numpy/torch on small arrays: one thread is the honest CPU figure
    work, out = Path(args.work), Path(args.out)
    lines, images, scenes, noise = load_work(work)  # scenes placed as their images show them
    results, http = {}, None
    for site in SITES:
        for method in METHODS:
            folder = work / method / site
            if not (folder / ex.SUMMARY_FILE).is_file():
                raise SystemExit(f"{folder} has no pass: `python -m training.shapes_labels --work {work}`")
            summary = ex.UnitSummary.load(folder)
            ordered = [scenes[int(i)] for i in summary.image_ids]
            start = time.perf_counter()
            kept = noise[summary.image_ids] if noise is not None else None
            oracle = ShapesOracle.fit(summary.half_acts, ordered, noise=kept)
            fit_seconds = time.perf_counter() - start
            coverage = concept_coverage(summary.half_acts.float().mean(0), ordered)
            units = unit_examples(summary, images, scenes, (8, 8), 10, trials=4 if method == "sae" else 0)
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                records = label_units(units, oracle, oracle, Path(tmp) / "labels.jsonl", seed=SEED)
                label_seconds = time.perf_counter() - start
            rows = [dataset_row(r, summary, oracle, 5) for r in records]
            s = summarise(rows, coverage, fit_seconds + label_seconds)
            scores = [r["score"] for r in rows if r["score"] is not None]
            s.update(fit_seconds=round(fit_seconds, 2), scores=scores,
                     unscored_few_examples=sum(r["score"] is None for r in rows))  # fmt: skip
            results[f"{method}/{site}"] = s
            print(f"{method:6s} {site:36s} median {s['median_score']:.3f}  "
                  f">=0.8 {s['share_score_ge_0.8']:.3f}  coverage {s['coverage']:.2f}  "
                  f"median best AUROC {s['median_best_auroc']:.3f}  "
                  f"{s['units_per_minute']:.0f} units/min")
            if http is None and method == "sae":  # units with all 5 top images, so every one is judged
                http = http_requests_per_unit([u for u in units if len(u.examples) >= 5])
    out.mkdir(parents=True, exist_ok=True)
    plot_scores(results, out / "autointerp_scores.png")
    plot_coverage(results, out / "autointerp_coverage.png")
    report = {
        "setup": {"scenes": len(lines), "steps": 8, "sites": list(SITES), "random_units": 2048,
                  "explainer": "shapes-oracle", "judge": "shapes-oracle", "n_positives": 5, "n_negatives": 5,
                  "threads": 1, "cpu": platform.processor() or platform.machine()},  # fmt: skip
        "known_independent": KNOWN,
        "results": {k: {kk: vv for kk, vv in v.items() if kk != "scores"} for k, v in results.items()},
        "http": http,
    }
    (out / "autointerp.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
