"""What each benchmark measures, how to run it, its target, and how its latest figures are read from its
results file. `benchmarks/report.py` renders this into benchmarks/README.md and the results table of
README.md, so no figure in either is typed by hand.

A summary function takes {results file name: its JSON} (only the files of its benchmark that exist) and
returns Markdown lines; a README row's function takes every results file and returns one short cell. Both
may simply index what they read: `report.py` shows "not run yet" where a file or a key is missing (a
benchmark never run, or a results file written by an older version of its script), so a summary never
needs to guard against that itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PACKAGED = ROOT / "fluxsae" / "shapes" / "dictionaries"
SITES = {"transformer_blocks.3.image": "double 3", "single_transformer_blocks.2.image": "single 2"}
METHODS = {
    "sae": "SAE",
    "itda": "ITDA",
    "mlp": "MLP neurons",
    "raw": "raw dimensions (both signs)",
    "random": "best of 2,048 random directions",
    "probe": "logistic probe (the linear ceiling)",
    "diff_of_means": "difference of means",
}

Results = dict[str, dict]


# ---------------------------------------------------------------- formatting and reading


def get(d, *path):
    """d[path[0]][path[1]]..., or None where a key is missing."""
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%".replace(".0%", "%")


def times(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def f3(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def packaged_cfg(kind: str, site: str) -> dict | None:
    path = PACKAGED / kind / site / "cfg.json"
    return json.loads(path.read_text()) if path.is_file() else None


def site_name(site: str) -> str:
    return f"{SITES.get(site, site)}"


# ---------------------------------------------------------------- summaries, one per benchmark


def shapes_quality(r: Results) -> list[str]:
    d = r["shapes_quality.json"]
    one = " / ".join(pct(d.get(f"one:{a}")) for a in ("color", "position", "size", "shape"))
    return [
        f"- One object, colour / position / size / shape read back right: {one} ({d['one:n']:.0f} scenes).",
        f"- Two objects, every attribute of both right: {pct(d['two:objects'])} ({d['two:n']:.0f} scenes); "
        f"an attribute taken from the other object: colour {pct(d['two:color_swapped'])}, shape "
        f"{pct(d['two:shape_swapped'])}, size {pct(d['two:size_swapped'])}.",
        f"- Held-out (colour, shape) pairs, both right: {pct(d['held_out_color_and_shape'])} (one object "
        f"{pct(d['held_out_color_and_shape:one'])}, two objects {pct(d['held_out_color_and_shape:two'])}).",
        f"- Generation at batch 1, median: {d['seconds_per_image_batch1_median']:.3f} s ({d['threads']} "
        "threads). Samples: `results/shapes_samples.png` (truth above, drawing below).",
    ]


def capture_overhead(r: Results) -> list[str]:
    d = r["capture_overhead.json"]
    args = d["args"]
    return [
        f"- {args['runs']} runs of each, {args['steps']} steps, {args['threads']} thread, site "
        f"`{args['site']}`: plain {1000 * d['median_s']['plain']:.2f} ms median; capturing every step "
        f"{times(d['ratio_to_plain']['capture_all_steps'])} (paired "
        f"{times(d['paired_median_ratio']['capture_all_steps'])}), step 0 only "
        f"{times(d['ratio_to_plain']['capture_step_0'])} (paired "
        f"{times(d['paired_median_ratio']['capture_step_0'])}).",
    ]


def harvest_speed(r: Results) -> list[str]:
    d = r["harvest_speed.json"]
    return [
        f"- {d['rounds']} rounds of {d['images_per_round']} prompts, {len(d['sites'])} sites, {d['dtype']}, "
        f"{d['threads']} threads: harvest {d['harvest_images_per_s']:.2f} images/s against plain "
        f"{d['plain_images_per_s']:.2f}: **{times(d['ratio'])}**; {d['tokens_per_s_per_site']:,.0f} stored "
        "tokens/s per site.",
    ]


def _sae_speed_rows(r: Results) -> list[list]:
    rows = []
    for name in sorted(r):
        d = r[name]
        c = d["config"]
        data = "Shapes activations" if c.get("acts") else "synthetic"
        shape = f"{c['d_in']} / {c['n_features']:,} / {c['k']} / {c['batch']:,}"
        rows.append(
            [
                f"`{name}`",
                data,
                shape,
                c["threads"],
                f"{d['step_ms']['ours']:.1f} / {d['step_ms']['theirs']:.1f}",
                f"**{times(d['speedup'])}**",
                f"{f3(d['held_out_fvu']['ours'])} / {f3(d['held_out_fvu']['theirs'])}",
                times(d["step_over_matmul"]),
                times(d.get("step_over_matmul_into_buffer")),
            ]
        )
    return rows


def sae_speed(r: Results) -> list[str]:
    header = [
        "results file",
        "data",
        "d_in / features / k / batch",
        "threads",
        "step ms, ours / sparsify",
        "speed-up",
        "held-out FVU, ours / sparsify",
        "step / `x @ W_enc.T`",
        "step / matmul into a buffer",
    ]
    return table(header, _sae_speed_rows(r))


def itda_vs_sae(r: Results) -> list[str]:
    lines = []
    for name in sorted(r):
        d = r[name]
        sae = d["sae"]
        lines += ["", f"`{d['site']}` ({site_name(d['site'])}; `{name}`, {d['date']}):", ""]
        rows = [
            [
                "TopK SAE",
                sae["n_features"],
                sae["k"],
                f"{sae['fvu']:.4f}",
                "1.00x",
                sae["train_seconds"],
                f"{sae['encode_tokens_per_s']:,.0f}",
            ]
        ]
        for i in d["itda"]:
            rows.append(
                [
                    f"ITDA {i['label']}",
                    i["n_atoms"],
                    sae["k"],
                    f"{i['fvu']:.4f}",
                    times(i["fvu"] / sae["fvu"]),
                    f"{i['build_seconds']:.1f}",
                    f"{i['encode_tokens_per_s']:,.0f}",
                ]
            )
        header = ["dictionary", "size", "L0", "held-out FVU", "vs SAE", "build / train s", "encode tokens/s"]
        lines += table(header, rows)
        speed = ", ".join(f"{t['n_atoms']:,} atoms {t['tokens_per_s']:,.0f}" for t in d["throughput"])
        lines += ["", f"Encode throughput of sampled ITDAs (tokens/s): {speed}."]
        now = packaged_cfg("sae", d["site"])
        if now and now["k"] != sae["k"]:
            lines += [
                f"The SAE measured here (k {sae['k']}, FVU {sae['fvu']:.4f}) has since been replaced by the "
                f"packaged k {now['k']} SAE (held-out FVU {get(now, 'extra', 'held_out', 'fvu'):.4f}); not "
                "rerun since."
            ]
    return lines[1:]


def memory(r: Results) -> list[str]:
    d = r["memory.json"]
    rows = []
    for run in d["runs"]:
        sae = run["train_sae"]
        rows.append(
            [
                f"{run['tokens'] / 1e6:.2f}M tokens ({run['harvest_gib']} GiB)",
                run["shards"],
                f"**{sae['norm_sample_65536']['peak_rss_gib']:.2f} GiB**",
                f"{sae['norm_sample_16384']['peak_rss_gib']:.2f} GiB",
                f"**{run['build_itda']['peak_rss_gib']:.2f} GiB**",
                f"{run['old_code_would_load']['train_sae_norm_sample_load_gib']:.0f} GiB",
            ]
        )
    header = [
        "harvest",
        "shards",
        "train_sae (`--norm-sample 65536`)",
        "train_sae (16384)",
        "build_itda",
        "what loading every shard at once would take",
    ]
    return table(header, rows)


def _interp_rows(d: dict, methods=("sae", "itda", "mlp", "raw", "random", "probe")) -> list[list]:
    rows = []
    for site, by_method in d["results"].items():
        for m in methods:
            s = get(by_method, m, "summary")
            if s is None:
                continue
            probes = " / ".join(f3(s.get(f"probe_{k}")) for k in (1, 2, 5)) if "probe_1" in s else ""
            silent = f"{pct(s['main_silent'])} / {pct(s['absorbed'])}" if "absorbed" in s else ""
            rows.append(
                [
                    site_name(site),
                    METHODS.get(m, m),
                    f3(s["median_best_auroc"]),
                    f"{s['coverage']:.2f}",
                    probes,
                    silent,
                ]
            )
    return rows


def interpretability(r: Results) -> list[str]:
    header = [
        "site",
        "units",
        "median best AUROC",
        "coverage",
        "sparse probe k = 1 / 2 / 5",
        "main unit silent / absorbed",
    ]
    lines = table(header, _interp_rows(r["interpretability.json"]))
    others = [n for n in ("interpretability_seed777.json", "interpretability_seed2027.json") if n in r]
    if others:
        lines += ["", "The packaged SAEs on other scene sets (`--seed S`), median best AUROC / coverage:"]
        for n in others:
            d = r[n]
            cells = [
                f"{site_name(s)} {f3(get(d, 'results', s, 'sae', 'summary', 'median_best_auroc'))} / "
                f"{get(d, 'results', s, 'sae', 'summary', 'coverage'):.2f}"
                for s in d["results"]
            ]
            lines.append(f"- seed {d['seed']} ({d['date']}): " + "; ".join(cells) + ".")
    return lines


def background_halo(r: Results) -> list[str]:
    d = r["background_halo.json"]
    rows = []
    for site, by_method in d["results"].items():
        for bg in ("black", "gray", "white"):
            c = by_method["sae"][f"background:{bg}"]
            rows.append(
                [
                    site_name(site),
                    bg,
                    f"{f3(c['unit']['all'])} / {f3(c['unit']['next_to_an_object'])}",
                    f"{f3(c['dom']['all'])} / {f3(c['dom']['next_to_an_object'])}",
                    f"{f3(c['lda']['all'])} / {f3(c['lda']['next_to_an_object'])}",
                    f"{pct(c['lda']['variance_share'])} / {pct(c['dom']['variance_share'])}",
                ]
            )
    header = [
        "site",
        "background",
        "best SAE unit: all / next to an object",
        "difference of means",
        "LDA",
        "variance along LDA / along the difference of means",
    ]
    return table(header, rows)


def localization(r: Results) -> list[str]:
    d = r["localization.json"]
    rows = []
    for key, s in d["summary"].items():
        method, _, site = key.partition(":")
        rows.append(
            [
                site_name(site),
                METHODS.get(method, method),
                f3(s["median_over_concepts_of_median_iou_half_max"]),
                f3(s["median_over_concepts_of_median_iou_otsu"]),
                f3(s["median_auroc_eval"]),
                pct(s["median_half_max_missed"]),
                pct(s["median_half_max_kept_full"]),
                pct(s["median_half_max_peak_off_concept"]),
            ]
        )
    header = [
        "site",
        "map",
        "median IoU (0.5 x peak)",
        "median IoU (Otsu)",
        "AUROC (eval half)",
        "concept tokens left off",
        "fully covered tokens kept",
        "peak off the concept",
    ]
    return table(header, rows)


def feature_profile(r: Results) -> list[str]:
    d = r["feature_profile.json"]
    rows = [
        [name, f3(v["median_iou_half_max"]), pct(v["median_missed"]), f3(v["median_auroc_eval"])]
        for name, v in d["topk_competition"].items()
    ]
    lines = table(["codes", "median IoU", "left off", "AUROC"], rows) + [""]
    bins = ("0.25-0.5", "0.5-0.75", "0.75-0.9", "0.9-1")
    rows = []
    for key, v in d["cover_profile"].items():
        method, _, site = key.partition(":")
        by = v["median_relative_to_peak_by_cover"]
        rows.append(
            [
                site_name(site),
                METHODS.get(method, method),
                *(f"{by[b]:.2f}" for b in bins),
                f"{v['median_spearman_with_cover']:.2f}",
            ]
        )
    lines += [
        "A map divided by its peak, median over a concept's tokens by how much of the token the object "
        "covers:",
        "",
    ]
    lines += table(["site", "map", *(f"covered {b}" for b in bins), "Spearman with the cover"], rows)
    zero = "; ".join(f"{site_name(s)} {v['median']:.2f}" for s, v in d["relu_zero_height"].items())
    return lines + [
        "",
        "Where the ReLU's zero lies on the step-averaged pre-activation (0: background median, 1: fully "
        f"covered tokens' median): {zero}.",
    ]


def _rate(f: dict) -> str:
    return f"{pct(f['success'])} / {pct(f['kept'])}"


def steering(r: Results) -> list[str]:
    d = r["steering.json"]
    colour, shape, region = d["colour_final"], d["shape_final"], d["region"]
    rows = [
        [
            "steering by words: text-stream SAE swap, 4 text sites, every step",
            _rate(colour["text SAE swap (d0-3 text)"]),
            _rate(shape["text SAE swap (d0-3 text)"]),
            _rate(region["text SAE swap, object 1's words"]),
        ],
        [
            "the same, the prompt's CFG pass only",
            _rate(colour["text SAE swap (d0-3 text), cond pass"]),
            _rate(shape["text SAE swap (d0-3 text), cond pass"]),
            "",
        ],
        [
            "image-stream SAE feature (double 3)",
            _rate(colour["sae"]),
            _rate(shape["sae"]),
            _rate(region["sae"]),
        ],
        [
            "image-stream ITDA atom (double 3)",
            _rate(colour["itda"]),
            _rate(shape["itda"]),
            _rate(region["itda"]),
        ],
        ["difference of means (double 3)", _rate(colour["dom"]), _rate(shape["dom"]), _rate(region["dom"])],
    ]
    header = [
        "recipe (reads B / kept)",
        f"colour A -> B ({colour['plain']['n']} trials)",
        f"shape A -> B ({shape['plain']['n']})",
        f"region: object 1 turns / object 2 kept ({region['sae']['n']})",
    ]
    cost = d["cost"]
    chosen = d["chosen_default"]
    return table(header, rows) + [
        "",
        f"Image-stream recipe picked by the sweep: strength {chosen['strength']:g}, steps "
        f"{chosen['steps'][0]}-{chosen['steps'][-1]}. Cost against a plain generation (batch 1, median of "
        f"interleaved rounds): add {times(cost['add (sae)']['ratio'])}, clamp + add "
        f"{times(cost['clamp + add (sae swap)']['ratio'])}, ITDA swap "
        f"{times(cost['clamp + add (itda swap)']['ratio'])}, text-SAE swap "
        f"{times(cost['text SAE swap']['ratio'])} (the prompt's pass only "
        f"{times(cost['text SAE swap, cond pass']['ratio'])}). Curves: `results/steering.png`.",
    ]


def autointerp(r: Results) -> list[str]:
    d = r["autointerp.json"]
    rows = []
    for key, s in d["results"].items():
        method, _, site = key.partition("/")
        rows.append(
            [
                site_name(site),
                METHODS.get(method, method) if method != "random" else "2,048 random directions",
                f"{s['median_score']:.3f}",
                pct(s["share_score_ge_0.8"]),
                f"{s['coverage']:.2f}",
                f3(s["median_best_auroc"]),
            ]
        )
    header = [
        "site",
        "units",
        "median score",
        "score >= 0.8",
        "coverage (best AUROC >= 0.9)",
        "median best AUROC",
    ]
    return table(header, rows) + [
        "",
        "Plots: `results/autointerp_scores.png`, `results/autointerp_coverage.png`.",
    ]


def app(r: Results) -> list[str]:
    d = r["app.json"]
    return [
        f"- Startup to ready {d['startup_to_ready_s']:.1f} s; generate + heatmap + top features "
        f"{d['generate_s']['median']:.2f} s median ({d['generate_handler_ms']['median']:.0f} ms in the "
        f"handler); a steered request (plain, steered and spliced-in images) {d['steer_s']['median']:.2f} s "
        f"median, of which the spliced image {d['steer_spliced_image_ms']['median']:.0f} ms "
        f"({d['generate_s']['n']} runs; {d['machine']}).",
    ]


def app_ranking(r: Results) -> list[str]:
    d = r["app_ranking.json"]
    by = {(x["site"], x["method"], x["rank"]): x for x in d["ranking"]}
    rows = []
    for site, method in dict.fromkeys((x["site"], x["method"]) for x in d["ranking"]):
        m, lift = by[site, method, "mass"], by[site, method, "lift"]
        rows.append(
            [
                site_name(site),
                METHODS[method],
                f"{pct(m['background'])} / {pct(lift['background'])}",
                f"{pct(m['object_in_scene'])} / {pct(lift['object_in_scene'])}",
                f"{pct(m['in_scene'])} / {pct(lift['in_scene'])}",
            ]
        )
    header = [
        "site",
        "dictionary",
        "background features (mass / lift)",
        "the scene's objects",
        "in the scene at all",
    ]
    dense = "; ".join(
        f"{site_name(x['site'])} {METHODS[x['method']]} {x['above_default_limit']}" for x in d["density"]
    )
    return table(header, rows) + [
        "",
        f"Features above the always-on filter's density (0.5), dropped from the table: {dense}. "
        f"{d['scenes']} scenes, top {d['top']}.",
    ]


def app_steering(r: Results) -> list[str]:
    d = r["app_steering.json"]
    c, s, g = d["colour"], d["shape"], d["region"]
    return [
        f"- Colour A -> B through `/swap`: reads B {pct(c['reads_b'])}, shape and cell kept "
        f"{pct(c['kept'])} ({c['trials']} trials); shape A -> B: {pct(s['reads_b'])} / {pct(s['kept'])} "
        f"({s['trials']}).",
        f"- A painted region over object 1: it turns {pct(g['object_turns_b'])}, object 2 kept "
        f"{pct(g['other_kept'])} ({g['both_objects_in_the_original']} of {g['trials']} trials showed both "
        "objects).",
        f"- `/swap` wall time {d['swap_seconds_median']:.2f} s median ({d['swap_seconds_p90']:.2f} s p90); "
        f"`python app.py` to its first answer {d['ready_seconds']:.1f} s.",
    ]


def labels_trust(r: Results) -> list[str]:
    d = r["labels_trust.json"]
    p = d["placement"]
    lines = [
        "- Truth: the drawn object against the sampled placement, median token IoU "
        f"{p['median_token_iou_sampled_vs_drawn']:.2f}, centroid shift {p['median_centroid_shift_px']:.1f} "
        f"px ({p['objects']} objects).",
        "",
        "Packaged labels on fresh scenes (section 2) and the oracle refitted there (section 3):",
        "",
    ]
    rows = []
    for key, e in d["honest_labels"].items():
        method, _, site = key.partition("/")
        fresh = get(d, "explained", key, "all") or {}
        rows.append(
            [
                site_name(site),
                METHODS[method],
                e["labels"],
                pct(e["share_precision_ge_0.8"]),
                f"{e['median_precision']:.2f} / {e['median_recall']:.2f}",
                pct(get(e, "explained", "f1_ge_0.5")),
                pct(fresh.get("f1_ge_0.5")),
            ]
        )
    for key, e in d["explained"].items():
        if key.startswith("random/"):
            rows.append(
                [
                    site_name(key.partition("/")[2]),
                    "2,048 random directions",
                    "",
                    "",
                    "",
                    "",
                    pct(e["all"].get("f1_ge_0.5")),
                ]
            )
    header = [
        "site",
        "units",
        "labels",
        "precision >= 0.8 on fresh scenes",
        "median precision / recall",
        "live units with a label of F1 >= 0.5",
        "the same, oracle refitted on fresh scenes",
    ]
    lines += table(header, rows)
    search = "; ".join(
        f"{site_name(s)} median AUROC {v['median_auroc']:.3f} (min {v['min_auroc']:.3f})"
        for s, v in d["search"].items()
    )
    first = "; ".join(
        f"{site_name(key.partition('/')[2])} {pct(first_groups(e))}"
        for key, e in d["honest_labels"].items()
        if "groups" in e
    )
    return lines + [
        "",
        "- Live SAE features among the first 128 (the general Matryoshka groups) whose packaged label "
        f"keeps F1 >= 0.5 on fresh scenes: {first}.",
        f"- The app's `/search`, first SAE feature for 12 words, against the truth: {search}.",
    ]


def first_groups(entry: dict, upto: int = 128) -> float:
    """Share of the live units among the first `upto` features with a label of F1 >= 0.5, from the
    per-Matryoshka-group figures of labels_trust.json (groups "a-b")."""
    live = hit = 0.0
    for name, g in entry["groups"].items():
        if int(name.partition("-")[2]) <= upto:
            live += g["live"]
            hit += g["live"] * g["f1_ge_0.5"]
    return hit / live


def _search_cell(r: Results) -> str:
    search = r["labels_trust.json"]["search"]
    return "; ".join(
        f"{site_name(s)} median {f3(v['median_auroc'])}, min {f3(v['min_auroc'])}" for s, v in search.items()
    )


def own_image(r: Results) -> list[str]:
    d = r["own_image.json"]
    h, e, p, a = d["heatmaps"], d["editing"], d["prompt_pairs"], d["analyse"]
    return [
        f"- Reconstruction at noise level {d['noise_level']:g}: the reader reads the same objects as the "
        f"input in {pct(h['reconstruction_reads_the_same_objects'])} of {h['scenes']} rendered scenes.",
        "- Heatmaps, median IoU of the best colour and shape features: rendered scenes "
        f"{f3(h['median_iou_rendered'])}, generated ones {f3(h['median_iou_generated'])}.",
        "- Editing a rendered scene's colour A -> B (text-stream swap during img2img): reads B "
        f"{pct(e['reads_b'])}, shape, size and cell kept {pct(e['kept'])} ({e['trials']} trials).",
        "- Two prompts differing in one attribute: the top feature of `features.diff` detects it (AUROC >= "
        f"0.9) in {pct(p['share_top_feature_detects_it'])} of {p['pairs']} pairs.",
        f"- `/analyse_image` through `gradio_client`: {a['median_seconds']:.2f} s median ({a['requests']} "
        "requests).",
    ]


def _experiment(r: Results, name: str) -> list[str]:
    d = r[name]
    rows = []
    for site, variants in d["results"].items():
        for variant, v in variants.items():
            s = v.get("summary") if isinstance(v, dict) else None
            if s is None:
                continue
            fvu = s.get("fvu") or get(v, "dictionary", "held_out", "fvu")
            atoms = get(v, "dictionary", "n_features")
            if atoms is None and "coarse_atoms" in variants:
                atoms = f"{variants['coarse_atoms']:,} + {variants['fine_atoms']:,}"
            l0 = s.get("l0") or get(v, "dictionary", "k")
            rows.append(
                [
                    site_name(site),
                    variant,
                    atoms if atoms is not None else "",
                    f3(s["median_best_auroc"]),
                    f"{s['coverage']:.2f}",
                    f3(fvu),
                    l0 if l0 is not None else "",
                ]
            )
    return table(["site", "variant", "atoms", "median best AUROC", "coverage", "FVU", "L0"], rows)


def itda_nested(r: Results) -> list[str]:
    return _experiment(r, "itda_nested.json")


def itda_object_share(r: Results) -> list[str]:
    return _experiment(r, "itda_object_share.json")


def flux_gpu(r: Results) -> list[str]:
    d = r.get("flux_gpu.json")
    smoke = r.get("flux_gpu_smoke.json")
    lines = []
    if d is None:
        lines.append("- **Not measured yet: the script has never run on a GPU.**")
    else:
        sae = " / ".join(f"{p} {times(get(d, 'sae', p, 'speedup'))}" for p in ("fp32", "bf16"))
        runs = "; ".join(
            f"{x['height']} px batch {x['batch']}: {times(x['capture_over_plain'])}"
            for x in get(d, "harvest", "runs") or []
        )
        lines += [f"- GPU run ({d.get('date', 'no date')}): SAE vs sparsify {sae}; harvest vs plain {runs}."]
    if smoke is not None:
        secs = smoke.get("seconds", {}).get("total")
        lines.append(
            f"- Smoke run on CPU ({smoke['date']}, `--smoke --threads 1`, reduced sizes): every section ran "
            f"end to end in {secs} s (`results/flux_gpu_smoke.json`); its figures say nothing about a GPU."
        )
    return lines


def packaged_dictionaries() -> list[list]:
    """Held-out and spliced-in figures the packaged Shapes dictionaries record in their cfg.json."""
    rows = []
    for kind in ("sae", "itda"):
        for site in SITES:
            cfg = packaged_cfg(kind, site)
            if cfg is None:
                continue
            held, spliced = get(cfg, "extra", "held_out") or {}, get(cfg, "extra", "spliced") or {}
            size = cfg.get("n_features") or cfg.get("n_atoms")
            rows.append(
                [
                    site_name(site),
                    f"{kind.upper()}, {size} {'features' if kind == 'sae' else 'atoms'}, L0 {cfg['k']}",
                    f3(held.get("fvu")),
                    pct(held.get("dead_fraction")),
                    f"{f3(spliced.get('velocity_recovered'))} / {f3(spliced.get('image_recovered'))}",
                ]
            )
    return rows


# ---------------------------------------------------------------- the catalog


@dataclass(frozen=True)
class Benchmark:
    """One script of benchmarks/ and what the catalog says about it."""

    key: str
    title: str
    script: str
    measures: str
    command: str
    target: str
    results: tuple[str, ...]
    summary: Callable[[Results], list[str]]
    experiment: bool = False
    """An experiment that was tried and not kept in the library (its figures explain a choice)."""
    changed: tuple[str, str] | None = None
    """(date, what changed then): results dated before it (or undated) were measured on what was there
    before, and the page says so until the benchmark is run again."""


CATALOG: tuple[Benchmark, ...] = (
    Benchmark(
        "shapes_quality",
        "Shapes model: does it draw what the caption says?",
        "shapes_quality.py",
        "The packaged Shapes model on 500 scenes of a seed training never used, read back from the pixels "
        "by `fluxsae.shapes.read_attributes`; held-out (colour, shape) pairs; generation time at batch 1.",
        "python benchmarks/shapes_quality.py",
        "one object: colour >= 98%, position >= 97%, size and shape >= 95%; two objects all right >= 80%; "
        "held-out pairs >= 80%; <= 0.2 s per image on a 2-core CPU",
        ("shapes_quality.json",),
        shapes_quality,
    ),
    Benchmark(
        "capture_overhead",
        "Capture overhead",
        "capture_overhead.py",
        "A generation inside `fluxsae.capture(pipe, [site])` against a plain one (tiny pipeline, CPU); "
        "plain and captured runs alternate in a rotating order after warm-up runs.",
        "python benchmarks/capture_overhead.py --runs 200 --threads 1",
        "<= 1.05x a plain generation (median)",
        ("capture_overhead.json",),
        capture_overhead,
    ),
    Benchmark(
        "harvest_speed",
        "Harvest throughput",
        "harvest_speed.py",
        "Harvesting (capture at every step, conversion to the storage dtype, a shard written) against "
        "plain generation of the same prompts to the latents, on the Shapes model.",
        "PYTHONPATH=. python benchmarks/harvest_speed.py --rounds 4",
        ">= 0.9x plain generation",
        ("harvest_speed.json",),
        harvest_speed,
    ),
    Benchmark(
        "sae_speed",
        "TopK SAE training against EleutherAI sparsify",
        "sae_speed.py",
        "One training step of `fluxsae` against eai-sparsify 1.3.3's `SparseCoder` in the same process: "
        "same data, batches, optimiser and learning rate; held-out FVU after the same tokens; one step "
        "against one dense encoder matmul. sparsify comes without its dependencies: `pip install --no-deps "
        "eai-sparsify==1.3.3 -c constraints.txt` then `pip install simple_parsing einops natsort "
        "schedulefree -c constraints.txt`.",
        "python benchmarks/sae_speed.py --threads 1 --d-in 3072 --n-features 16384 --k 64 --batch 1024 "
        "--steps 25 --warmup 5 --held-out 4096 --out "
        "benchmarks/results/sae_speed_d3072_n16384_k64_b1024_t1.json",
        "throughput >= 1.2x sparsify; held-out FVU no worse; one step <= 2x one dense encoder matmul",
        (
            "sae_speed_d3072_n16384_k64_b1024_t1.json",
            "sae_speed_d512_n8192_k32_t1.json",
            "sae_speed_d128_n2048_k24_t1.json",
            "sae_speed_synthetic_t2.json",
            "sae_speed_synthetic_t1.json",
            "sae_speed_synthetic_t2_batch1024.json",
            "sae_speed_synthetic_t2_n8192.json",
            "sae_speed_shapes_t2_seed0.json",
            "sae_speed_shapes_t2_seed1.json",
            "sae_speed_shapes_t2_seed2.json",
            "sae_speed_shapes_t1.json",
        ),
        sae_speed,
    ),
    Benchmark(
        "memory",
        "Memory of training on a FLUX.1-sized harvest",
        "memory.py",
        "Peak resident memory of `python -m training.train_sae` and `python -m training.build_itda`, run "
        "as child processes on synthetic harvests in the real on-disk format at FLUX.1's width (d 3,072, "
        "bf16, 256 image tokens per prompt and step x 4 steps).",
        "python benchmarks/memory.py --tokens 2000000,4000000 --work /tmp/fluxsae_memory --out "
        "benchmarks/results/memory.json",
        "under 4 GiB, and not growing with the number of shards",
        ("memory.json",),
        memory,
    ),
    Benchmark(
        "itda_vs_sae",
        "ITDA against the TopK SAE",
        "itda_vs_sae.py",
        "ITDAs built from the same harvest as the packaged SAE, at its L0, at several thresholds and "
        "capped at its width (centred, and raw as in the ITDA paper): held-out FVU, build time against SAE "
        "training, and encode throughput up to 50k atoms. Needs the harvest of `python -m "
        "training.shapes_dictionaries`.",
        "python -m benchmarks.itda_vs_sae --acts runs/shapes_dictionaries/harvest --site "
        "transformer_blocks.3.image --sae shapes --thresholds 0.6,0.4,0.25,0.15 --match-threshold 0.1 "
        "--threads 2 --out benchmarks/results/itda_vs_sae_d3.json",
        "at the SAE's width and L0, held-out FVU <= 1.3x the SAE's; build time <= 10% of SAE training",
        ("itda_vs_sae_d3.json", "itda_vs_sae_s2.json"),
        itda_vs_sae,
    ),
    Benchmark(
        "interpretability",
        "Does one unit mean one thing?",
        "interpretability.py",
        "SAE features, ITDA atoms, MLP neurons, raw dimensions and 2,048 random directions against the "
        "Shapes truth on 200 unseen scenes: for each of the 15 single concepts, the unit with the best "
        "token AUROC on the first 100 scenes, scored on the other 100 (coverage: share of concepts at >= "
        "0.9); sparse probing with the best 1, 2, 5 units; absorption; a logistic probe on the whole "
        "residual as the ceiling.",
        "python benchmarks/interpretability.py --cache runs/interp_acts.safetensors",
        "SAE coverage >= 0.9, above MLP neurons and random directions",
        ("interpretability.json", "interpretability_seed777.json", "interpretability_seed2027.json"),
        interpretability,
    ),
    Benchmark(
        "localization",
        "Does a concept's best feature light up the concept?",
        "localization.py",
        "For each colour and shape, the feature with the best AUROC (first 100 scenes) is painted on the "
        "other 100 as `feature_heatmap` paints it (codes averaged over steps), cut at 0.5 x its peak and "
        "compared with the concept's token mask (IoU); the difference of means and a logistic probe beside "
        "it; where the half-max maps go wrong.",
        "python benchmarks/localization.py --cache runs/interp_acts.safetensors",
        "median IoU >= 0.5 for the packaged SAE",
        ("localization.json",),
        localization,
    ),
    Benchmark(
        "background_halo",
        "Why no single unit reads the backgrounds",
        "background_halo.py",
        "For each background concept: the best SAE unit, the difference of means and LDA, on all its "
        "tokens and on those next to an object; the share of the token variance along each direction.",
        "python benchmarks/background_halo.py --cache runs/interp_acts.safetensors",
        "(a diagnostic; no target)",
        ("background_halo.json",),
        background_halo,
    ),
    Benchmark(
        "feature_profile",
        "Why single 2's heatmaps leave part of the object off",
        "feature_profile.py",
        "Two diagnostics of the localisation figure: the packaged SAEs encoded with 2k, 4k or no top-k "
        "(does TopK's competition cut the object's edge?), and each map's activation over the object by "
        "how much of a token the object covers.",
        "python benchmarks/feature_profile.py --cache runs/interp_acts.safetensors",
        "(a diagnostic; no target)",
        ("feature_profile.json",),
        feature_profile,
    ),
    Benchmark(
        "steering",
        "Steering by features and by words",
        "steering.py",
        "`fluxsae.steer` on the Shapes model, judged by `read_attributes` on the generated pixels: colour "
        "A -> B and shape A -> B on one-object scenes (kept: the other attributes and the cell), a region "
        "(object 1 of two), ablation, and the cost of a steered generation. Directions: the packaged SAE's "
        "and ITDA's best unit per concept, the difference of means, and the text-stream SAEs' word "
        "features.",
        "python benchmarks/steering.py",
        "colour and shape: >= 80% read B and >= 80% kept; region: >= 70% of objects 1 turn and >= 90% of "
        "objects 2 kept; a steered generation <= 1.1x a plain one",
        ("steering.json",),
        steering,
    ),
    Benchmark(
        "labels_trust",
        "Labels a user can trust",
        "labels_trust.py",
        "On Shapes scenes no label run saw: where the model draws each object; every packaged label's "
        "precision, recall and F1 at its own threshold; the oracle refitted there for SAE, ITDA, MLP "
        "neurons and random directions; the app's `/search` against the truth; how often rare features "
        "fire again under other noise.",
        "python benchmarks/labels_trust.py",
        "every label's precision >= 0.8 on fresh scenes (else the unit is `unexplained`); each searched "
        "word's first feature AUROC >= 0.9, none under 0.75; >= 80% of the live features among the first "
        "128 labelled at F1 >= 0.5",
        ("labels_trust.json",),
        labels_trust,
    ),
    Benchmark(
        "autointerp",
        "Autointerp with the reference work's score",
        "autointerp.py",
        "The reference work's protocol (5 top images explained, 5 + 5 judged) with the Shapes oracle as "
        "explainer and judge, per method and site, against 2,048 random directions as a floor; concept "
        "coverage; oracle throughput. Reads the pass `python -m training.shapes_labels --work W` leaves.",
        "python -m benchmarks.autointerp --work runs/shapes_labels",
        "SAE above the random floor",
        ("autointerp.json",),
        autointerp,
        changed=(
            "2026-12-08",
            "the packaged labels were rebuilt by detection (400 scenes)",
        ),
    ),
    Benchmark(
        "app",
        "The app as a user meets it",
        "app.py",
        "`python app.py` in a fresh process, requests through `gradio_client`: startup to ready, "
        "`/generate` (image, heatmap, top features) and `/steer` (plain, steered and spliced-in images) "
        "wall times.",
        "python benchmarks/app.py --runs 10",
        "startup <= 20 s; generate <= 1 s median; steer <= 2 s median (2 CPU cores)",
        ("app.json",),
        app,
        changed=("2026-12-08", "the app gained steering by words, detection labels and the panels"),
    ),
    Benchmark(
        "app_steering",
        "Steering from the app",
        "app_steering.py",
        "The app's own `/swap` endpoint through `gradio_client`: colour and shape A -> B on one-object "
        "prompts, a painted region over one of two objects, and the cost of a request.",
        "python benchmarks/app_steering.py",
        "colour reads B >= 85% and shape and cell kept >= 85%; shape >= 80% / 80%; painted region: object "
        "1 turns >= 70%, object 2 kept >= 90%; a steered pair <= 2 s median; the app ready within 20 s",
        ("app_steering.json",),
        app_steering,
    ),
    Benchmark(
        "own_image",
        "Your own image, and two prompts",
        "own_image.py",
        "Rendered Shapes scenes (`fluxsae.shapes.render`, never generated by the model) stand in for real "
        "images: the reconstruction at the default noise level read back; heatmaps of the best colour and "
        "shape features on rendered against generated scenes; a colour edit by the text-stream swap during "
        "img2img; prompt pairs that differ in one attribute, whose top `features.diff` feature should "
        "detect it; the app's `/analyse_image` wall time.",
        "python benchmarks/own_image.py",
        "reconstruction reads the same objects >= 95%; rendered IoU within 0.05 of generated; edit reads B "
        ">= 80%, kept >= 90%; the pair's top feature detects the attribute in >= 80% of pairs; analysis <= "
        "2 s",
        ("own_image.json",),
        own_image,
    ),
    Benchmark(
        "app_ranking",
        "Which features top the app's table",
        "app_ranking.py",
        "The top 5 features of fresh scenes, ranked by activation mass or by lift (mass over the feature's "
        "usual mass), read through their labels: background features, the scene's objects, anything in the "
        "scene.",
        "python benchmarks/app_ranking.py --scenes 24",
        "(chooses the default ranking; no target)",
        ("app_ranking.json",),
        app_ranking,
        changed=("2026-12-08", "the packaged labels, which it reads, were rebuilt by detection"),
    ),
    Benchmark(
        "flux_gpu",
        "FLUX.1 at full size on a GPU",
        "flux_gpu.py",
        "Every GPU figure of FLUX.1 in one run (no network, about 8 minutes on one H200): `sae` "
        "(sae_speed.py at d 3,072, 65,536 features, k 64, batch 4,096, float32 and bf16 autocast), `itda` "
        "(encode at 1k-50k atoms), `harvest` (random-weight FLUX.1-schnell in bf16: plain against capture "
        "of two sites at every step, 256 px and 1024 px) and `memory` (bf16 against NF4 through "
        "`load_pipeline(folder, "
        'quantize="nf4")`). Each section writes the JSON as it ends. A GPU machine without diffusers, '
        "bitsandbytes or sparsify gets them as wheels: `bash benchmarks/flux_gpu_wheels.sh` here, then "
        "there `python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl` and "
        "`PYTHONPATH=/tmp/site`.",
        "python benchmarks/flux_gpu.py          # on CUDA; --smoke --threads 1 checks it on CPU",
        "SAE >= 1.2x sparsify, FVU no worse; harvest >= 0.9x plain; NF4 transformer near 7 GB, pipeline "
        "under 16 GB",
        ("flux_gpu.json", "flux_gpu_smoke.json"),
        flux_gpu,
    ),
    Benchmark(
        "itda_nested",
        "ITDA with nested codes",
        "itda_nested.py",
        "Pursuit over a pruned ITDA first, then over the packaged atoms on what is left (a Matryoshka "
        "prefix for ITDA), scored like `interpretability.py`.",
        "python benchmarks/itda_nested.py --cache runs/interp_acts.safetensors --coarse "
        "runs/itda/p0.4/dict --k1 0,24,64 --k2 24",
        "(an experiment)",
        ("itda_nested.json",),
        itda_nested,
        experiment=True,
    ),
    Benchmark(
        "itda_object_share",
        "ITDA atoms drawn from object tokens",
        "itda_object_share.py",
        "ITDA builds that keep every object token of a batch and only as many background tokens as make "
        "the objects a given share of the candidates, scored like `interpretability.py`.",
        "python -m benchmarks.itda_object_share --acts runs/sd24/harvest --site "
        "single_transformer_blocks.2.image --object-share 0.5 --out runs/itda_obj/s50",
        "(an experiment)",
        ("itda_object_share.json",),
        itda_object_share,
        experiment=True,
    ),
)


@dataclass(frozen=True)
class Row:
    """One row of README.md's results table."""

    what: str
    target: str
    figure: Callable[[Results], str]
    benchmark: str


def _interp_cell(r: Results) -> str:
    d = r["interpretability.json"]["results"]
    parts = []
    for site in SITES:
        s = {m: get(d, site, m, "summary") for m in ("sae", "mlp", "random")}
        parts.append(
            f"{site_name(site)}: {s['sae']['coverage']:.2f} / {f3(s['sae']['median_best_auroc'])} (MLP "
            f"{f3(s['mlp']['median_best_auroc'])}, random {f3(s['random']['median_best_auroc'])})"
        )
    return "; ".join(parts)


def _loc_cell(r: Results) -> str:
    s = r["localization.json"]["summary"]
    return "; ".join(
        f"{site_name(site)} {f3(s[f'sae:{site}']['median_over_concepts_of_median_iou_half_max'])} (probe "
        f"{f3(s[f'probe:{site}']['median_over_concepts_of_median_iou_half_max'])})"
        for site in SITES
    )


def _steer_cell(r: Results) -> str:
    d = r["steering.json"]
    return (
        f"by words: colour {_rate(d['colour_final'][TEXT_SWAP])}, shape "
        f"{_rate(d['shape_final'][TEXT_SWAP])}, region {_rate(d['region'][REGION_WORDS])}; one image-stream "
        f"feature: colour {_rate(d['colour_final']['sae'])}"
    )


TEXT_SWAP = "text SAE swap (d0-3 text)"
REGION_WORDS = "text SAE swap, object 1's words"


def _itda_cell(r: Results) -> str:
    parts = []
    for name in ("itda_vs_sae_d3.json", "itda_vs_sae_s2.json"):
        d = r[name]
        capped = [
            i for i in d["itda"] if i["n_atoms"] == d["sae"]["n_features"] and i["label"].endswith("cap")
        ]
        i = capped[0]
        parts.append(
            f"{site_name(d['site'])} {times(i['fvu'] / d['sae']['fvu'])}, built in "
            f"{pct(i['build_seconds'] / d['sae']['train_seconds'])} of the SAE's time"
        )
    return "; ".join(parts) + " (against a k 24 TopK SAE trained on the same harvest)"


def _app_steer_cell(r: Results) -> str:
    d = r["app_steering.json"]
    c, s, g = d["colour"], d["shape"], d["region"]
    return (
        f"{pct(c['reads_b'])} / {pct(c['kept'])}; {pct(s['reads_b'])} / {pct(s['kept'])}; "
        f"{pct(g['object_turns_b'])} / {pct(g['other_kept'])}"
    )


def _own_image_cell(r: Results) -> str:
    d = r["own_image.json"]
    return (
        f"{pct(d['heatmaps']['reconstruction_reads_the_same_objects'])}; {pct(d['editing']['reads_b'])} / "
        f"{pct(d['editing']['kept'])}; {pct(d['prompt_pairs']['share_top_feature_detects_it'])}"
    )


def _packaged_cell(_: Results) -> str:
    """From the packaged SAEs' own cfg.json (the build records its held-out and spliced-in figures)."""
    rows = [row for row in packaged_dictionaries() if row[1].startswith("SAE")]
    if not rows:
        raise KeyError(f"{PACKAGED.relative_to(ROOT)}/sae/<site>/cfg.json")
    return "; ".join(f"{row[0]} {row[2]} / {row[3]} / {row[4]}" for row in rows)


ROWS: tuple[Row, ...] = (
    Row(
        "Shapes model: one object drawn right (colour / position / size / shape); two objects all right; "
        "held-out pairs",
        "98 / 97 / 95 / 95%; 80%; 80%",
        lambda r: (
            " / ".join(
                pct(r["shapes_quality.json"][f"one:{a}"]) for a in ("color", "position", "size", "shape")
            )
            + f"; {pct(r['shapes_quality.json']['two:objects'])}; "
            f"{pct(r['shapes_quality.json']['held_out_color_and_shape'])}"
        ),
        "shapes_quality",
    ),
    Row(
        "Packaged Shapes SAEs: held-out FVU / dead features / velocity and image recovered when spliced in",
        "<= 0.10 / <= 5% / >= 0.9",
        _packaged_cell,
        "interpretability",
    ),
    Row(
        "One feature per concept: coverage / median best AUROC of the 15 Shapes concepts",
        ">= 0.9, above MLP and random",
        _interp_cell,
        "interpretability",
    ),
    Row(
        "Heatmap of a concept's best feature: median IoU with the concept's tokens",
        ">= 0.5",
        _loc_cell,
        "localization",
    ),
    Row(
        "Steering, reads B / kept (colour, shape; region: object 1 turns / object 2 kept)",
        "80 / 80%; region 70 / 90%",
        _steer_cell,
        "steering",
    ),
    Row(
        "Steered generation against plain: add / text-stream swap on the prompt's pass",
        "<= 1.1x",
        lambda r: (
            f"{times(r['steering.json']['cost']['add (sae)']['ratio'])} / "
            f"{times(r['steering.json']['cost']['text SAE swap, cond pass']['ratio'])}"
        ),
        "steering",
    ),
    Row(
        "Packaged SAE labels on fresh scenes: share with precision >= 0.8 (double 3 / single 2)",
        "100%",
        lambda r: " / ".join(
            pct(r["labels_trust.json"]["honest_labels"][f"sae/{s}"]["share_precision_ge_0.8"]) for s in SITES
        ),
        "labels_trust",
    ),
    Row(
        "Label search in the app: AUROC of the first feature for 12 words",
        ">= 0.9, none < 0.75",
        _search_cell,
        "labels_trust",
    ),
    Row("ITDA against the SAE at equal width and L0: held-out FVU", "<= 1.3x", _itda_cell, "itda_vs_sae"),
    Row(
        "Capture overhead (tiny pipeline, CPU)",
        "<= 1.05x",
        lambda r: times(r["capture_overhead.json"]["ratio_to_plain"]["capture_all_steps"]),
        "capture_overhead",
    ),
    Row(
        "Harvest against plain generation",
        ">= 0.9x",
        lambda r: times(r["harvest_speed.json"]["ratio"]),
        "harvest_speed",
    ),
    Row(
        "SAE training against sparsify at FLUX.1's width (CPU, d 3,072, 16,384 features)",
        ">= 1.2x",
        lambda r: times(r["sae_speed_d3072_n16384_k64_b1024_t1.json"]["speedup"]),
        "sae_speed",
    ),
    Row(
        "Peak memory of train_sae / build_itda on a 4M-token FLUX.1-width harvest",
        "< 4 GiB",
        lambda r: " / ".join(
            f"{x:.2f} GiB"
            for x in (
                r["memory.json"]["runs"][-1]["train_sae"]["norm_sample_65536"]["peak_rss_gib"],
                r["memory.json"]["runs"][-1]["build_itda"]["peak_rss_gib"],
            )
        ),
        "memory",
    ),
    Row(
        "The app: startup / generate / steer (median)",
        "20 / 1 / 2 s",
        lambda r: " / ".join(
            f"{v:.1f} s"
            for v in (
                r["app.json"]["startup_to_ready_s"],
                r["app.json"]["generate_s"]["median"],
                r["app.json"]["steer_s"]["median"],
            )
        ),
        "app",
    ),
    Row(
        "Steering by words in the app (`/swap`): colour, shape (reads B / kept); painted region (turns / "
        "kept)",
        "85 / 85%; 80 / 80%; 70 / 90%",
        _app_steer_cell,
        "app_steering",
    ),
    Row(
        "Your own image: reconstruction read back; edit reads B / kept; prompt pairs whose top feature "
        "detects the change",
        "95%; 80 / 90%; 80%",
        _own_image_cell,
        "own_image",
    ),
    Row(
        "FLUX.1 on a GPU (SAE vs sparsify at 65,536 features, harvest, NF4 memory)",
        "SAE >= 1.2x sparsify",
        lambda r: f"SAE {times(get(r['flux_gpu.json'], 'sae', 'bf16', 'speedup'))} (bf16)",
        "flux_gpu",
    ),
)


def by_key(key: str) -> Benchmark:
    return next(b for b in CATALOG if b.key == key)
