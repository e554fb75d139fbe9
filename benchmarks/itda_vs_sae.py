"""ITDA against a trained TopK SAE on the same harvest and site: reconstruction, build time, encode speed.

The ITDA claims (Leask et al. 2025): it builds in ~1% of an SAE's time and data and reaches >= 90% of
its reconstruction; on FLUX.1 the reference work found its reconstruction comparable or better at
equal dictionary size. This measures those claims on our activations:

- ITDAs are built at the SAE's L0 (its k) with several thresholds (one pass over the training shards,
  or the first `--build-tokens` of them), plus one capped at the SAE's width, so dictionary sizes run
  from small to >= the SAE's width; the capped one is also built without centring ("raw": atoms are
  the tokens themselves, no bias), to show what centring buys. Held-out FVU of each (the shards the
  SAE never saw either: `split_shards` with the same `--held-out`) beside the SAE's, and the build
  time beside the SAE's training time (`cfg.extra["seconds_this_run"]` of the SAE folder, when
  recorded).
- Encode throughput (tokens/s) of ITDAs of up to 50,000 atoms. Building that many atoms takes long, so
  these dictionaries are real training activations sampled at random and unit-normalised: the same
  shapes and the same pursuit, for speed only (their FVU is not reported). The SAE's encode speed is
  measured beside them.

    python -m benchmarks.itda_vs_sae --acts runs/harvest --site transformer_blocks.3.image \\
        --sae runs/saes --thresholds 0.8,0.6,0.4,0.2,0.1 --sizes 1000,5000,20000,50000

Writes `--out` (JSON) and the same name with .png (FVU vs size, build time vs size, encode speed vs
size), and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import fluxsae
from fluxsae.activations import ActivationStore, split_shards
from fluxsae.evaluate import reconstruction_metrics
from fluxsae.fileio import atomic_path, write_json
from fluxsae.hub import load_sae
from fluxsae.itda import ITDA, ITDAConfig
from fluxsae.itda_build import build_itda
from training.build_itda import manifest_batches

RESULTS = Path(__file__).parent / "results" / "itda_vs_sae.json"


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def limited(batches, max_tokens: int):
    """The batches up to `max_tokens` tokens in all (0: all of them)."""
    seen = 0
    for x, manifest in batches:
        if max_tokens and seen >= max_tokens:
            return
        yield x, manifest
        seen += len(x)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def encode_speed(dictionary, x: torch.Tensor, device: str, repeats: int = 3) -> float:
    """Tokens per second of `dictionary.encode_sparse(x)`: the median of `repeats` timed runs after one
    warm-up (the sparse path: what steering and heatmaps use, no dense [tokens, n] codes)."""
    dictionary.encode_sparse(x)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        dictionary.encode_sparse(x)
        sync(device)
        times.append(time.perf_counter() - t0)
    return len(x) / statistics.median(times)


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    sae, speed = result["sae"], sorted(result["throughput"], key=lambda r: r["n_atoms"])
    rows = sorted(result["itda"], key=lambda r: r["n_atoms"])
    # one pass at a threshold (a line), capped at the SAE's width (markers), capped without centring
    sweep = [r for r in rows if not r.get("max_atoms")]
    capped = [r for r in rows if r.get("max_atoms") and r.get("center", True)]
    raw = [r for r in rows if r.get("max_atoms") and not r.get("center", True)]
    series = [(sweep, "o-", "C0", "ITDA, threshold sweep"), (capped, "s", "C2", "ITDA, capped at SAE width"),
              (raw, "x", "gray", "ITDA, capped, raw atoms (no centring)")]  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = ((axes[0], "fvu", "Reconstruction (held out)"), (axes[1], "build_seconds", "Build time"))
    for ax, key, title in panels:
        for rs, style, color, label in series:
            if rs:
                ax.plot([r["n_atoms"] for r in rs], [r[key] for r in rs], style, color=color, label=label)
        if key == "fvu":
            for r in rows:
                ax.annotate(r["label"], (r["n_atoms"], r["fvu"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")  # fmt: skip
            ax.plot([sae["n_features"]], [sae["fvu"]], "r*", ms=12, label=f"TopK SAE (k={sae['k']})")
            ax.set(ylabel="held-out FVU", title=f"{title}, L0 {sae['k']}")
        else:
            if sae.get("train_seconds"):
                ax.axhline(sae["train_seconds"], color="r", ls="--", label="SAE training")
            ax.set(yscale="log", ylabel="seconds", title=title)
        ax.set(xscale="log", xlabel="dictionary size")
        ax.legend(fontsize=7)
    ax = axes[2]
    ax.plot([r["n_atoms"] for r in speed], [r["tokens_per_s"] for r in speed], "o-", label="ITDA encode")
    ax.plot([sae["n_features"]], [sae["encode_tokens_per_s"]], "r*", ms=12, label="SAE encode")
    ax.set(xscale="log", yscale="log", xlabel="dictionary size", ylabel="tokens / s", title="Encode speed")
    ax.legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.suptitle(f"ITDA vs TopK SAE at {result['site']}", fontsize=10)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def markdown(result: dict) -> str:
    sae = result["sae"]
    lines = [
        "| dictionary | size | k | held-out FVU | FVU vs SAE | build / train s | encode tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| TopK SAE | {sae['n_features']} | {sae['k']} | {sae['fvu']:.4f} | 1.00x | "
        f"{sae.get('train_seconds') or 'n/a'} | {sae['encode_tokens_per_s']:.0f} |",
    ]
    for r in result["itda"]:
        lines.append(
            f"| ITDA {r['label']} | {r['n_atoms']} | {sae['k']} | {r['fvu']:.4f} | "
            f"{r['fvu'] / sae['fvu']:.2f}x | "
            f"{r['build_seconds']:.3g} | {r['encode_tokens_per_s']:.0f} |"
        )
    lines += ["", "| sampled ITDA atoms | encode tokens/s |", "|---:|---:|"]
    lines += [f"| {r['n_atoms']} | {r['tokens_per_s']:.0f} |" for r in result["throughput"]]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--acts", type=Path, required=True, help="harvest folder")
    ap.add_argument("--site", required=True)
    ap.add_argument("--sae", required=True, help="SAE folder (or repo) for fluxsae.load_sae(SAE, site=SITE)")
    ap.add_argument("--thresholds", type=floats, default=floats("0.8,0.6,0.4,0.3,0.2,0.1"))
    ap.add_argument(
        "--match-width", action=argparse.BooleanOptionalAction, default=True,
        help="also build one ITDA capped at the SAE's width (threshold --match-threshold)",
    )  # fmt: skip
    ap.add_argument("--match-threshold", type=float, default=0.05)
    ap.add_argument(
        "--sizes", type=lambda s: [int(v) for v in floats(s)], default=[1000, 5000, 20000, 50000],
        help="dictionary sizes of the throughput-only runs (sampled real activations)",
    )  # fmt: skip
    ap.add_argument("--held-out", type=float, default=0.1, help="as when the SAE was trained")
    ap.add_argument("--batch-size", type=int, default=4096, help="ITDA build batch")
    ap.add_argument("--round-size", type=int, default=256)
    ap.add_argument("--build-tokens", type=int, default=0, help="training tokens per build (0: all)")
    ap.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens evaluated (0: all)")
    ap.add_argument("--speed-tokens", type=int, default=4096, help="tokens per encode-speed run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    store = ActivationStore(args.acts)
    train, held_out = split_shards(len(store.shards), args.held_out)
    if not held_out:
        raise SystemExit(f"{args.acts} has {len(store.shards)} shard(s): too few to hold any out.")
    g = torch.Generator().manual_seed(args.seed)
    x_eval, _ = store.load(args.site, held_out)
    if args.eval_tokens and len(x_eval) > args.eval_tokens:
        x_eval = x_eval[torch.randperm(len(x_eval), generator=g)[: args.eval_tokens]]
    x_eval = x_eval.to(args.device)
    x_speed = x_eval[: args.speed_tokens]

    sae = load_sae(args.sae, site=args.site, device=args.device)
    k = sae.cfg.k
    sae_metrics = reconstruction_metrics(sae, x_eval)
    with torch.no_grad():
        sae_speed = encode_speed(sae, x_speed, args.device)
    sae_row = {
        "n_features": sae.cfg.n_features, "k": k, "fvu": sae_metrics["fvu"], "l0": sae_metrics["l0"],
        "dead_fraction": sae_metrics["dead_fraction"], "train_seconds": sae.cfg.extra.get("seconds_this_run"),
        "train_tokens": sae.cfg.extra.get("tokens"), "encode_tokens_per_s": sae_speed,
    }  # fmt: skip
    print(f"SAE: {sae.cfg.n_features} features, k={k}, held-out FVU {sae_metrics['fvu']:.4f}")

    harvest = store.config
    base = ITDAConfig(
        d_in=store.dim(args.site), k=k, site=args.site, base_model=harvest["model"],
        round_size=args.round_size or None, extra={"generation": harvest["generation"]},
    )  # fmt: skip
    runs = [(f"t={t:g}", {"threshold": t}) for t in args.thresholds]
    if args.match_width:
        cap = {"threshold": args.match_threshold, "max_atoms": sae.cfg.n_features}
        runs.append((f"t={args.match_threshold:g}, cap", cap))
        # the same without centring (raw atoms, as in the ITDA paper): what the bias buys
        runs.append((f"t={args.match_threshold:g}, cap, raw", {**cap, "center": False}))
    rows = []
    for label, settings in runs:
        batches = manifest_batches(store, args.site, train, args.batch_size, args.seed)
        t0 = time.perf_counter()
        itda = build_itda(limited(batches, args.build_tokens), base, device=args.device, **settings)
        sync(args.device)
        seconds = time.perf_counter() - t0
        m = reconstruction_metrics(itda, x_eval)
        speed_here = encode_speed(itda, x_speed, args.device)
        row = {
            "label": label, **settings, "n_atoms": itda.n_atoms, "build_seconds": seconds,
            "build_tokens": itda.cfg.extra["build"]["tokens"], "fvu": m["fvu"], "l0": m["l0"],
            "dead_fraction": m["dead_fraction"], "encode_tokens_per_s": speed_here,
        }  # fmt: skip
        rows.append(row)
        print(f"ITDA {label}: {itda.n_atoms} atoms in {seconds:.1f} s, held-out FVU {m['fvu']:.4f}")

    # Throughput only: dictionaries of sampled real activations, up to 50k atoms.
    pool, _ = store.load(args.site, train[: max(1, len(train))])
    speed = []
    for n in args.sizes:
        pick = torch.randperm(len(pool), generator=g)[:n]
        atoms = pool[pick].float()
        atoms = atoms[atoms.norm(dim=1) > 0]
        atoms = atoms / atoms.norm(dim=1, keepdim=True)
        if len(atoms) < n:
            print(f"(only {len(atoms)} training tokens to sample {n} atoms from)")
        itda = ITDA(base, atoms).to(args.device)
        speed.append({"n_atoms": len(atoms), "tokens_per_s": encode_speed(itda, x_speed, args.device)})
        print(f"encode speed with {len(atoms)} atoms: {speed[-1]['tokens_per_s']:.0f} tokens/s")

    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} CPUs",
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "fluxsae": fluxsae.__version__,
        "site": args.site,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "eval_tokens": len(x_eval),
        "sae": sae_row,
        "itda": rows,
        "throughput": speed,
    }
    write_json(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    print(markdown(result))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
