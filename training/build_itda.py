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

import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
from safetensors import safe_open
from tqdm import tqdm

from fluxsae.activations import ActivationStore, ActivationStoreError, split_shards
from fluxsae.dictionary import DictionaryLoadError
from fluxsae.evaluate import reconstruction_metrics
from fluxsae.fileio import write_json
from fluxsae.itda import ITDAConfig
from fluxsae.itda_build import build_itda
from fluxsae.sites import parse_site
from training.cli import Range, check_config, dictionary_command
from training.work import check_out, check_run_folder, claim

logger = logging.getLogger("training.build_itda")


@dataclass(frozen=True)
class BuildConfig:
    """One ITDA build (saved as `--work/build_config.json`; a resumed build must match it)."""

    acts: str
    """Harvest folder (`python -m training.harvest`)."""
    site: str
    """Site to build on, one of the harvest's sites."""
    k: Annotated[int, Range(1)] = 16
    """L0 of the codes (atoms per token; at most the site's width)."""
    threshold: Annotated[float, Range(0, 1, low_open=True)] = 0.6
    """Add a token as an atom when its normalised error exceeds this (reference: 0.6, range 0.1-0.6)."""
    max_atoms: Annotated[int, Range(1)] | None = None
    """Stop adding atoms at this many; the build then ends (None: no cap)."""
    prune_cosine: Annotated[float, Range(0, 1, low_open=True)] | None = None
    """Drop candidates with a cosine above this to a kept atom (reference: 0.8; None: only 0.99
    duplicates)."""
    round_size: Annotated[int, Range(1)] | None = 256
    """Candidates of one batch added per round before the rest are re-checked (None: all at once)."""
    encoder: Literal["gradient_pursuit", "matching_pursuit"] = "gradient_pursuit"
    """How codes are computed."""
    center: bool = True
    """Centre atoms and tokens on the mean activation of the first batch (fluxsae.itda); False: raw atoms."""
    batch_size: Annotated[int, Range(1)] = 4096
    """Tokens per batch."""
    held_out: Annotated[float, Range(0, 1, high_open=True)] = 0.1
    """Share of shards kept for evaluation (never used to build)."""
    eval_tokens: Annotated[int, Range(1)] | None = None
    """Held-out tokens to evaluate on, a random subset (None: all of them, streamed)."""
    seed: Annotated[int, Range(0, 2**32 - 2)] = 0
    """Seed of the shuffled data order."""
    shards_in_memory: Annotated[int, Range(1)] = 8
    """Shards read and shuffled together: memory holds this many shards in their storage dtype."""
    checkpoint_every: Annotated[int, Range(1)] = 20
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
    yield from store.shuffled_chunks(
        site, order, batch_size, g, shards_in_memory=shards_in_memory, with_manifest=True, keep_last=True
    )


def itda_config(cfg: BuildConfig, store: ActivationStore) -> ITDAConfig:
    harvest = store.config
    gen = harvest["generation"]
    return ITDAConfig(
        d_in=store.dim(cfg.site), k=cfg.k, site=cfg.site, base_model=harvest["model"],
        base_revision=harvest.get("revision"), threshold=cfg.threshold, max_atoms=cfg.max_atoms,
        prune_cosine=cfg.prune_cosine, round_size=cfg.round_size, encoder=cfg.encoder,
        center=cfg.center,
        steps=tuple(harvest["steps"]), resolution=(gen["height"], gen["width"]), dtype=harvest["dtype"],
        quantization=harvest.get("quantization"), extra={"generation": gen},
    )  # fmt: skip


SLOW_K = 128
"""Above this L0 the build says how much slower it will be: the pursuit's cost grows with k (the
reference used 32-64)."""


def check_settings(cfg: BuildConfig, store: ActivationStore) -> None:
    """SystemExit naming the flag, the value and what is allowed for a setting that cannot work with this
    harvest; a warning for one that works but slowly."""
    d = store.dim(cfg.site)
    if cfg.k > d:
        raise SystemExit(
            f"--k {cfg.k} exceeds the width of {cfg.site} (d_in={d}): a token is a combination of at most "
            f"d_in independent atoms, so a larger L0 only costs time. Pass --k {min(32, d)} (the reference "
            "used 32-64)."
        )
    if cfg.k > SLOW_K:
        logger.warning(
            "--k %d: the pursuit runs k rounds per token, so this build takes about %.0fx the time of the "
            "reference's L0 32 (and every encode of the result too)", cfg.k, cfg.k / 32,
        )  # fmt: skip


def build(
    cfg: BuildConfig, work: Path, out: Path | None, device: str = "cpu", progress: bool = True, *,
    overwrite: bool = False,
) -> dict:  # fmt: skip
    """Build (or resume building) the ITDA of `cfg`; returns the result dict (also in work/result.json).
    Every setting is checked before any work (SystemExit says which is wrong); `overwrite`: replace a
    different ITDA already in `out/<site>/` (refused otherwise)."""
    check_config(cfg)
    work = Path(work)
    check_run_folder(work, "build_config.json")
    check_out(None if out is None else Path(out) / cfg.site, "build_config", asdict(cfg), overwrite=overwrite,
              what="build's ITDA")  # fmt: skip
    try:
        store = ActivationStore(cfg.acts)
        store.dim(cfg.site)
    except ActivationStoreError as e:
        raise SystemExit(f"--acts {cfg.acts}: {e}") from e
    check_settings(cfg, store)
    train_shards, eval_shards = split_shards(len(store.shards), cfg.held_out)
    if not train_shards:
        raise SystemExit(f"{cfg.acts} has no shards to build from; harvest first.")
    claim(work, "build_config.json", cfg, what="a build")

    itda_cfg = itda_config(cfg, store)
    stream = parse_site(cfg.site).stream
    train_rows = sum(store.shards[i].rows[stream] for i in train_shards)
    total = -(-train_rows // cfg.batch_size)
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
    try:
        itda = build_itda(
            batches, itda_cfg, prompts=prompts, checkpoint=checkpoint,
            checkpoint_every=cfg.checkpoint_every, on_batch=on_batch, device=device,
        )  # fmt: skip
    except DictionaryLoadError as e:  # an unreadable checkpoint: the message says what to do
        raise SystemExit(str(e)) from e
    bar.close()
    result = {
        "n_atoms": itda.n_atoms,
        "seconds_this_run": round(time.time() - t0, 2),
        **itda.cfg.extra["build"],
    }
    if eval_shards:  # streamed, or only the sampled rows read: memory never holds the held-out shards
        held_out_rows = sum(store.shards[i].rows[stream] for i in eval_shards)
        if cfg.eval_tokens is not None and held_out_rows > cfg.eval_tokens:
            x = store.sample_rows(cfg.site, eval_shards, cfg.eval_tokens, seed=cfg.seed + 1)
        else:
            x = store.iter_rows(cfg.site, eval_shards)
        result["held_out"] = reconstruction_metrics(itda, x)
    extra = {**itda.cfg.extra, "build_config": asdict(cfg), **result}
    itda.cfg = dataclasses.replace(itda.cfg, extra=extra)
    if out is not None:
        itda.cpu().save(out / cfg.site)
    write_json(work / "result.json", result)
    return result


def main(argv=None) -> None:
    cfg, args = dictionary_command(
        BuildConfig,
        argv,
        __doc__,
        work_help="checkpoint, build_config.json, result.json",
        out_help="dictionary folder: the ITDA goes to OUT/<site>/",
    )
    result = build(cfg, args.work, args.out, args.device, overwrite=args.overwrite)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
