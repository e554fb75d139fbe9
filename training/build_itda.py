"""Build an ITDA dictionary (real activations as atoms, with provenance) from harvested activations.

    python -m training.build_itda --acts runs/harvest --site transformer_blocks.3.image \\
        --out runs/itda --work runs/itda_work --k 16 --threshold 0.6

One pass over the training shards, in a shuffled order that is a pure function of --seed (the last
`--held-out` share of shards is never used to build, only to evaluate). The partial dictionary is
checkpointed atomically to `--work` every `--checkpoint-every` batches; run the same command again
after a kill and it resumes where the checkpoint left off. The final dictionary goes to
`--out/<site>/` (cfg.json, itda.safetensors, atoms.parquet); build time, atom count and held-out
FVU / L0 are printed and written to `--work/result.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from tqdm import tqdm

from fluxsae.activations import ActivationStore, split_shards
from fluxsae.evaluate import reconstruction_metrics
from fluxsae.fileio import write_json
from fluxsae.itda import ITDAConfig, build_itda
from fluxsae.sites import parse_site
from training.cli import add_config_arguments, config_from_args

logger = logging.getLogger("training.build_itda")


@dataclass(frozen=True)
class BuildConfig:
    """One ITDA build (saved as `--work/build_config.json`; a resumed build must match it)."""

    acts: str
    """Harvest folder (`python -m training.harvest`)."""
    site: str
    """Site to build on, one of the harvest's sites."""
    k: int = 16
    """L0 of the codes (atoms per token)."""
    threshold: float = 0.6
    """Add a token as an atom when its normalised error exceeds this (reference: 0.6, range 0.1-0.6)."""
    max_atoms: int = 0
    """Stop adding atoms at this many (0: no cap)."""
    prune_cosine: float = 0.0
    """Drop candidates with a cosine above this to a kept atom (reference: 0.8; 0: only 0.99 duplicates)."""
    round_size: int = 256
    """Candidates of one batch added per round before the rest are re-checked (0: all at once)."""
    encoder: Literal["gradient_pursuit", "matching_pursuit"] = "gradient_pursuit"
    """How codes are computed."""
    center: bool = True
    """Centre atoms and tokens on the mean activation of the first batch (fluxsae.itda); False: raw atoms."""
    batch_size: int = 4096
    """Tokens per batch."""
    held_out: float = 0.1
    """Share of shards kept for evaluation (never used to build)."""
    eval_tokens: int = 0
    """Held-out tokens to evaluate on, a random subset (0: all of them)."""
    seed: int = 0
    """Seed of the shuffled data order."""
    shards_in_memory: int = 8
    """Shards loaded and shuffled together."""
    checkpoint_every: int = 20
    """Batches between checkpoints."""


def manifest_batches(
    store: ActivationStore,
    site: str,
    shards: list[int],
    batch_size: int,
    seed: int,
    shards_in_memory: int = 8,
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """One pass of shuffled (x [B, d], manifest {field: [B]}) batches over `shards`.

    Shards come in a seeded order, `shards_in_memory` at a time, rows shuffled within that window; the
    order is a pure function of `seed`, so a resumed build sees the same batches. Unlike
    `ActivationStore.batches`, every row is used: the last batch may be smaller.
    """
    g = torch.Generator().manual_seed(seed)
    order = [shards[i] for i in torch.randperm(len(shards), generator=g).tolist()]
    carry_x, carry_m = None, None
    for start in range(0, len(order), shards_in_memory):
        x, manifest = store.load(site, order[start : start + shards_in_memory])
        perm = torch.randperm(len(x), generator=g)
        x, manifest = x[perm], {k: v[perm] for k, v in manifest.items()}
        if carry_x is not None:
            x = torch.cat([carry_x, x])
            manifest = {k: torch.cat([carry_m[k], v]) for k, v in manifest.items()}
        n_full = len(x) // batch_size
        for b in range(n_full):
            sl = slice(b * batch_size, (b + 1) * batch_size)
            yield x[sl], {k: v[sl] for k, v in manifest.items()}
        rest = slice(n_full * batch_size, None)
        carry_x, carry_m = x[rest], {k: v[rest] for k, v in manifest.items()}
    if carry_x is not None and len(carry_x):
        yield carry_x, carry_m


def itda_config(cfg: BuildConfig, store: ActivationStore) -> ITDAConfig:
    harvest = store.config
    gen = harvest["generation"]
    return ITDAConfig(
        d_in=store.dim(cfg.site), k=cfg.k, site=cfg.site, base_model=harvest["model"],
        base_revision=harvest.get("revision"), threshold=cfg.threshold, max_atoms=cfg.max_atoms or None,
        prune_cosine=cfg.prune_cosine or None, round_size=cfg.round_size or None, encoder=cfg.encoder,
        center=cfg.center,
        steps=tuple(harvest["steps"]), resolution=(gen["height"], gen["width"]), dtype=harvest["dtype"],
        quantization=harvest.get("quantization"), extra={"generation": gen},
    )  # fmt: skip


def build(cfg: BuildConfig, work: Path, out: Path | None, device: str = "cpu", progress: bool = True) -> dict:
    """Build (or resume building) the ITDA of `cfg`; returns the result dict (also in work/result.json)."""
    store = ActivationStore(cfg.acts)
    train_shards, eval_shards = split_shards(len(store.shards), cfg.held_out)
    if not train_shards:
        raise SystemExit(f"{cfg.acts} has no shards to build from; harvest first.")
    work.mkdir(parents=True, exist_ok=True)
    saved = work / "build_config.json"
    if saved.exists() and json.loads(saved.read_text()) != json.loads(json.dumps(asdict(cfg))):
        raise SystemExit(
            f"{work} holds a build with other settings ({saved}); pass another --work or delete it."
        )
    write_json(saved, asdict(cfg))

    itda_cfg = itda_config(cfg, store)
    stream = parse_site(cfg.site).stream
    stream_rows = sum(store.shards[i].rows[stream] for i in train_shards)
    total = -(-stream_rows // cfg.batch_size)
    checkpoint = work / "checkpoint.safetensors"
    done = 0
    if checkpoint.is_file():  # a resumed build skips the batches before its checkpoint
        with safe_open(str(checkpoint), framework="pt") as f:
            done = json.loads((f.metadata() or {}).get("batches_seen", "0"))
    bar = tqdm(total=total, initial=done, desc=f"ITDA {cfg.site}", unit="batch", disable=not progress)

    def on_batch(report) -> None:
        bar.update(1)
        bar.set_postfix(atoms=report.n_atoms, added=report.added, fvu=f"{report.fvu:.3f}")

    prompts = {int(p["id"]): p["prompt"] for p in store.prompts()}
    batches = manifest_batches(store, cfg.site, train_shards, cfg.batch_size, cfg.seed, cfg.shards_in_memory)
    t0 = time.time()
    itda = build_itda(
        batches, itda_cfg, prompts=prompts, checkpoint=checkpoint,
        checkpoint_every=cfg.checkpoint_every, on_batch=on_batch, device=device,
    )  # fmt: skip
    bar.close()
    result = {
        "n_atoms": itda.n_atoms,
        "seconds_this_run": round(time.time() - t0, 2),
        **itda.cfg.extra["build"],
    }
    if eval_shards:
        x, _ = store.load(cfg.site, eval_shards)
        if cfg.eval_tokens and len(x) > cfg.eval_tokens:
            g = torch.Generator().manual_seed(cfg.seed + 1)
            x = x[torch.randperm(len(x), generator=g)[: cfg.eval_tokens]]
        result["held_out"] = reconstruction_metrics(itda, x)
    extra = {**itda.cfg.extra, "build_config": asdict(cfg), **result}
    itda.cfg = dataclasses.replace(itda.cfg, extra=extra)
    if out is not None:
        itda.cpu().save(out / cfg.site)
    write_json(work / "result.json", result)
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="checkpoint, build_config.json, result.json")
    p.add_argument("--out", type=Path, default=None, help="dictionary folder: the ITDA goes to OUT/<site>/")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    add_config_arguments(p, BuildConfig)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from_args(BuildConfig, args)
    result = build(cfg, args.work, args.out, args.device)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
