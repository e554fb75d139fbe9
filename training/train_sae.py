"""Train a TopK SAE on harvested activations, on one process or data-parallel under torchrun.

    python -m training.train_sae --acts runs/harvest --site transformer_blocks.3.image \\
        --out runs/saes --work runs/sae_work --n-features 2048 --k 16 --tokens 20000000
    torchrun --nproc-per-node 2 -m training.train_sae ...   # DDP; --batch-size is per process

The last `--held-out` share of shards (prompts training never sees) is kept for evaluation.
Checkpoints go to `--work` every `--checkpoint-every` steps, atomically; run the same command again
after a kill and it resumes at the last checkpoint, on the same data order (batches are a pure
function of seed, epoch and position). Metrics are appended to `--work/metrics.jsonl` and drawn to
`--work/curves.png`; the final SAE (normalisation folded into its weights) goes to `--out/<site>/`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.distributed as dist
from tqdm import tqdm

from fluxsae.activations import STORAGE_DTYPES, ActivationStore, ActivationStoreError, split_shards
from fluxsae.evaluate import reconstruction_metrics
from fluxsae.fileio import write_json
from fluxsae.sae import WHITEN_POWER, SAEConfig, TopKSAE
from fluxsae.sae_training import (
    default_lr,
    make_optimizer,
    scene_consistency,
    scene_decorrelation,
    scene_overlap,
    train_step,
)
from fluxsae.sites import parse_site
from training.cli import Range, check_config, dictionary_command
from training.resources import check_memory, human_bytes
from training.work import (
    append_jsonl,
    check_out,
    check_run_folder,
    claim,
    load_checkpoint,
    read_jsonl,
    save_checkpoint,
)

logger = logging.getLogger("training.train_sae")


@dataclass(frozen=True)
class TrainConfig:
    """One SAE training run (saved as `--work/train_config.json`; a resumed run must match it)."""

    acts: str
    """Harvest folder (`python -m training.harvest`)."""
    site: str
    """Site to train on, one of the harvest's sites."""
    n_features: Annotated[int, Range(1)] = 2048
    """Dictionary width."""
    k: Annotated[int, Range(1)] = 16
    """Active features per token."""
    tokens: Annotated[int, Range(1)] = 10_000_000
    """Training tokens in total (all processes together); epochs repeat the data as needed."""
    batch_size: Annotated[int, Range(1)] = 4096
    """Tokens per step and per process: the global batch is batch_size x world size."""
    lr: Annotated[float, Range(0, 1, low_open=True)] | None = None
    """Adam learning rate; None picks 2e-4 / sqrt(n_features / 2**14) as sparsify does (`default_lr`)."""
    lr_decay: Annotated[float, Range(0, 1)] = 0.0
    """Share of the last steps over which the learning rate falls linearly to 0 (`lr_at`; SAELens's
    lr_decay_steps, Anthropic's 2024 recipe decays over the last 20%); 0: constant."""
    normalization: Literal["none", "standardize", "pca", "whiten"] = "standardize"
    """Input normalisation learnt from `norm_sample` random training tokens, folded in on export."""
    whiten_power: Annotated[float, Range(0, 0.5)] = WHITEN_POWER
    """For --normalization whiten: the power p of C^-p (0: standardise, 0.5: full whitening;
    `SAEConfig.whiten_power`)."""
    norm_sample: Annotated[int, Range(2)] = 65_536
    """Training tokens drawn at random (seeded by `seed`) to fit the normalisation, initialise the
    decoder bias and measure the mean token norm; only these rows are read from disk."""
    matryoshka: Annotated[tuple[int, ...], Range(1)] = ()
    """Matryoshka prefix widths (e.g. 16,128,512): the first m features must also reconstruct alone,
    which keeps general features general (`SAEConfig.matryoshka`); empty: a plain TopK SAE."""
    matryoshka_weights: Annotated[tuple[float, ...], Range(0)] = ()
    """Weights of the prefixes' FVU terms in the Matryoshka loss, one per --matryoshka width (the whole
    dictionary weighs 1; `fluxsae.sae_training.train_step`); empty: all 1, the plain mean."""
    batch_topk: bool = False
    """BatchTopK: keep the batch's N x k largest activations rather than k per token; encoding then
    uses the running threshold (`SAEConfig.batch_topk`)."""
    scene_features: Annotated[int, Range(0)] = 0
    """Scene features: this many features, from --scene-offset on, are pushed to be constant over
    each image (the loss adds --scene-weight x their within-image / total variance,
    `fluxsae.sae_training.scene_consistency`) and batches hold whole images, so --batch-size must be
    a multiple of an image's tokens. A scene's background then gets features of its own (0: off)."""
    scene_offset: Annotated[int, Range(0)] = 0
    """Index of the first scene feature (with --matryoshka, inside which prefix they lie)."""
    scene_weight: Annotated[float, Range(0)] = 0.1
    """lambda of the scene-consistency term."""
    scene_decorrelation: Annotated[float, Range(0)] = 0.0
    """mu: the scene term becomes lambda x (consistency + mu x the scene features' positive correlation
    across images, `fluxsae.sae_training.scene_decorrelation`), so they stop duplicating one another
    (0: off; needs at least 2 scene features)."""
    scene_overlap: Annotated[float, Range(0)] = 0.0
    """nu: adds lambda x nu x the scene features' overlap across images (squared cosine of their image
    means, `fluxsae.sae_training.scene_overlap`), pushing each toward scenes of its own kind
    (0: off; needs at least 2 scene features)."""
    aux_k: Annotated[int, Range(0)] = 256
    """AuxK: dead features per token used to model the residual (0: no AuxK loss)."""
    dead_after_tokens: Annotated[int, Range(1)] = 2_000_000
    """A feature that has not fired for this many tokens counts as dead."""
    held_out: Annotated[float, Range(0, 1, high_open=True)] = 0.1
    """Share of shards kept for evaluation."""
    seed: Annotated[int, Range(0, 2**32 - 1)] = 0
    """Seeds the initialisation, the normalisation sample and the data order."""
    log_every: Annotated[int, Range(1)] = 20
    """Steps between rows of metrics.jsonl."""
    checkpoint_every: Annotated[int, Range(1)] = 200
    """Steps between checkpoints (written atomically; a rerun resumes from the last one)."""
    shards_in_memory: Annotated[int, Range(1)] = 8
    """Shards read and shuffled together: memory holds this many shards in their storage dtype."""


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def build_sae(cfg: TrainConfig, store: ActivationStore, train_shards: list[int]) -> TopKSAE:
    """A fresh SAE with its normalisation fitted on `norm_sample` random training tokens (read alone
    from the shards: memory holds the sample, not the harvest)."""
    sample = store.sample_rows(cfg.site, train_shards, cfg.norm_sample, seed=cfg.seed)
    harvest = store.config
    gen = harvest["generation"]
    sae_cfg = SAEConfig(
        d_in=store.dim(cfg.site), n_features=cfg.n_features, k=cfg.k, site=cfg.site,
        base_model=harvest["model"], base_revision=harvest.get("revision"), normalization=cfg.normalization,
        whiten_power=cfg.whiten_power,
        aux_k=cfg.aux_k, dead_after_tokens=cfg.dead_after_tokens, matryoshka=tuple(cfg.matryoshka),
        batch_topk=cfg.batch_topk,
        mean_token_norm=sample.norm(dim=-1).mean().item(), steps=tuple(harvest["steps"]),
        resolution=(gen["height"], gen["width"]), dtype=harvest["dtype"],
        quantization=harvest.get("quantization"),
    )  # fmt: skip
    torch.manual_seed(cfg.seed)
    sae = TopKSAE(sae_cfg)
    sae.fit_normalization(sample, cfg.normalization)
    sae.init_b_dec_from_data(sample)
    return sae


def scene_loss(cfg: TrainConfig, store: ActivationStore):
    """(images per batch, the loss term of `train_step`) for `cfg`'s scene features, or (None, None)
    without them; SystemExit says what is wrong with the settings."""
    pairwise = (("--scene-decorrelation", cfg.scene_decorrelation), ("--scene-overlap", cfg.scene_overlap))
    for flag, value in pairwise:
        if value and cfg.scene_features < 2:
            raise SystemExit(f"{flag} compares scene features in pairs: use --scene-features 2 or more.")
    if not cfg.scene_features:
        return None, None
    features = range(cfg.scene_offset, cfg.scene_offset + cfg.scene_features)
    if cfg.scene_features < 0 or cfg.scene_offset < 0 or features.stop > cfg.n_features:
        raise SystemExit(
            f"--scene-features {cfg.scene_features} from --scene-offset {cfg.scene_offset} must lie "
            f"among the {cfg.n_features} features (0 <= offset, offset + count <= --n-features)."
        )
    per_image = store.tokens_per_image(cfg.site)
    if cfg.batch_size % per_image:
        raise SystemExit(
            f"--scene-features needs batches of whole images: --batch-size {cfg.batch_size} is not a "
            f"multiple of the {per_image} tokens of one image at {cfg.site}; use e.g. "
            f"{max(1, cfg.batch_size // per_image) * per_image}."
        )

    def loss(out):
        term = scene_consistency(out, per_image, features)
        if cfg.scene_decorrelation:
            term = term + cfg.scene_decorrelation * scene_decorrelation(out, per_image, features)
        if cfg.scene_overlap:
            term = term + cfg.scene_overlap * scene_overlap(out, per_image, features)
        return cfg.scene_weight * term

    return cfg.batch_size // per_image, loss


def matryoshka_weights(cfg: TrainConfig) -> tuple[float, ...] | None:
    """`train_step`'s prefix_weights for --matryoshka-weights (None: the plain mean); SystemExit says
    what is wrong with them."""
    if not cfg.matryoshka_weights:
        return None
    if len(cfg.matryoshka_weights) != len(cfg.matryoshka) or not all(
        0 <= w < float("inf") for w in cfg.matryoshka_weights
    ):
        raise SystemExit(
            f"--matryoshka-weights needs one finite weight >= 0 per --matryoshka width "
            f"({','.join(map(str, cfg.matryoshka)) or 'none given'}), got "
            f"{','.join(map(str, cfg.matryoshka_weights))}."
        )
    return tuple(cfg.matryoshka_weights)


def _sync_dead_tracking(sae: TopKSAE, before: torch.Tensor, global_tokens: int, world: int) -> None:
    """Make `tokens_since_fired` global: a feature fired if it fired on any process."""
    if world == 1:
        return
    fired = (sae.tokens_since_fired < before + global_tokens // world).to(torch.int32)
    dist.all_reduce(fired, op=dist.ReduceOp.MAX)
    sae.tokens_since_fired.copy_(torch.where(fired.bool(), torch.zeros_like(before), before + global_tokens))


def plot_curves(metrics_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(metrics_path)
    train = [r for r in rows if "fvu" in r]
    if not train:
        return
    tokens = [r["tokens"] / 1e6 for r in train]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key, title in zip(
        axes, ("fvu", "dead_fraction", "aux_loss"), ("FVU (train batch)", "dead features", "AuxK loss"),
        strict=True,
    ):  # fmt: skip
        ax.plot(tokens, [r[key] for r in train], lw=1)
        ax.set_title(title)
        ax.set_xlabel("tokens (M)")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    evals = [r for r in rows if "eval_fvu" in r]
    if evals:
        axes[0].plot(
            [r["tokens"] / 1e6 for r in evals], [r["eval_fvu"] for r in evals], "o-", label="held-out"
        )
        axes[0].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def lr_at(step: int, total_steps: int, lr: float, decay: float) -> float:
    """The learning rate of step `step` (0-based) of `total_steps`: `lr`, then over the last `decay`
    share of the steps a linear fall that would reach 0 one step after the end."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"lr_decay is a share of the steps, between 0 and 1; got {decay}")
    decay_steps = round(decay * total_steps)
    start = total_steps - decay_steps
    if decay_steps == 0 or step < start:
        return lr
    return lr * (total_steps - step) / (decay_steps + 1)


def check_settings(cfg: TrainConfig) -> None:
    """SystemExit naming the flag, the value and what is allowed, for every setting that is out of range
    on its own (`check_config`) or does not fit the others; needs no data."""
    check_config(cfg)
    n = cfg.n_features
    if cfg.k > n:
        raise SystemExit(
            f"--k {cfg.k} exceeds --n-features {n}: a token cannot use more features than there are."
        )
    if cfg.aux_k > n:
        raise SystemExit(
            f"--aux-k {cfg.aux_k} (the default is 256) exceeds --n-features {n}: AuxK models the residual "
            f"with at most that many dead features. Pass --aux-k {n // 2} (or 0 to turn it off)."
        )
    if cfg.matryoshka and (list(cfg.matryoshka) != sorted(set(cfg.matryoshka)) or cfg.matryoshka[-1] >= n):
        raise SystemExit(
            f"--matryoshka {','.join(map(str, cfg.matryoshka))}: the prefix widths must increase and stay "
            f"below --n-features {n} (e.g. {max(1, n // 64)},{max(2, n // 8)})."
        )


def check_fits(
    cfg: TrainConfig, store: ActivationStore, train_shards: list[int], world: int, device: str
) -> int:
    """SystemExit if the run would train nothing (fewer --tokens than one step's batch) or cannot fit
    in memory; returns the number of steps. Says how long the run is."""
    global_batch = cfg.batch_size * world
    steps = cfg.tokens // global_batch
    if steps == 0:
        raise SystemExit(
            f"--tokens {cfg.tokens} is less than one step's batch of {global_batch} tokens (--batch-size "
            f"{cfg.batch_size} x {world} process(es)): nothing would be trained. Raise --tokens."
        )
    stream = parse_site(cfg.site).stream
    rows = [store.shards[i].rows[stream] for i in train_shards]
    if store.steps_per_epoch(cfg.site, cfg.batch_size, world, train_shards) == 0:
        raise SystemExit(
            f"{cfg.acts} has {sum(rows)} training tokens at {cfg.site}, fewer than one step's batch of "
            f"{global_batch}: harvest more, or lower --batch-size."
        )
    d = store.dim(cfg.site)
    itemsize = torch.empty(0, dtype=STORAGE_DTYPES[store.config["dtype"]]).element_size()
    params = 2 * cfg.n_features * d + cfg.n_features + d
    norm = cfg.norm_sample * d * 4 + (2 * d * d * 8 if cfg.normalization in ("pca", "whiten") else 0)
    need = (
        4 * params * 4  # float32 weights, gradients and Adam's two moments
        + 8 * cfg.batch_size * d * 4  # a batch and the encoder's / decoder's [batch, d] tensors
        + cfg.shards_in_memory * max(rows) * d * itemsize  # the shuffling window, in the storage dtype
        + norm
    ) * int(os.environ.get("LOCAL_WORLD_SIZE", 1) if torch.device(device).type == "cpu" else 1)
    check_memory(
        need, device, f"Training {cfg.n_features} features on d_in={d}",
        "Lower --n-features, --batch-size or --shards-in-memory.",
    )  # fmt: skip
    epochs = steps * global_batch / max(1, sum(rows))
    logger.info(
        "%d steps of %d tokens (%.1f epochs of %d training tokens), about %s of memory",
        steps, global_batch, epochs, sum(rows), human_bytes(need),
    )  # fmt: skip
    return steps


def _open_store(cfg: TrainConfig) -> ActivationStore:
    try:
        store = ActivationStore(cfg.acts)
        store.dim(cfg.site)
    except ActivationStoreError as e:
        raise SystemExit(f"--acts {cfg.acts}: {e}") from e
    return store


def train(
    cfg: TrainConfig, work: Path, out: Path | None, device: str = "cpu", *, overwrite: bool = False
) -> dict:
    """Train (or resume training) the SAE of `cfg` in `work`; the SAE goes to `out/<site>/`. Every setting
    is checked before any work: SystemExit says which is wrong. `overwrite`: replace a different SAE
    already in `out/<site>/` (refused otherwise)."""
    check_settings(cfg)
    work = Path(work)
    check_run_folder(work, "train_config.json")
    check_out(None if out is None else Path(out) / cfg.site, "training", asdict(cfg), overwrite=overwrite,
              what="training run's SAE")  # fmt: skip
    rank, world = _distributed()
    store = _open_store(cfg)
    train_shards, eval_shards = split_shards(len(store.shards), cfg.held_out)
    if not train_shards:
        raise SystemExit(f"{cfg.acts} has no shards to train on; harvest first.")
    images_per_batch, extra_loss = scene_loss(cfg, store)
    prefix_weights = matryoshka_weights(cfg)
    total_steps = check_fits(cfg, store, train_shards, world, device)
    claim(work, "train_config.json", cfg, what="a run", write=rank == 0)

    sae = build_sae(cfg, store, train_shards).to(device)
    lr = cfg.lr if cfg.lr is not None else default_lr(cfg.n_features)
    opt = make_optimizer(sae, lr)
    ckpt = work / "checkpoint.safetensors"
    step, tokens = 0, 0
    if ckpt.exists():
        try:
            meta = load_checkpoint(ckpt, {"sae": sae}, opt)
            step, tokens = meta["step"], meta["tokens"]
        except Exception as e:  # safetensors, shape and key errors alike: say which file and what to do
            raise SystemExit(
                f"{ckpt} is not a checkpoint of this SAE training ({type(e).__name__}: {e}); pass another "
                f"--work, or delete the file to start this run over."
            ) from e
        logger.info("resuming at step %d (%d tokens)", step, tokens)
    model = torch.nn.parallel.DistributedDataParallel(sae, broadcast_buffers=False) if world > 1 else sae
    global_batch = cfg.batch_size * world
    per_epoch = store.steps_per_epoch(cfg.site, cfg.batch_size, world, train_shards)
    metrics = work / "metrics.jsonl"
    bar = tqdm(total=total_steps, initial=step, desc=f"SAE {cfg.site}", disable=rank != 0, unit="step")
    t0 = time.time()
    last_fvu = None
    while step < total_steps:
        epoch, skip = divmod(step, per_epoch)
        where = dict(shards=train_shards, seed=cfg.seed, epoch=epoch, rank=rank, world_size=world,
                     shards_in_memory=cfg.shards_in_memory)  # fmt: skip
        if images_per_batch is None:
            batches = store.batches(cfg.site, cfg.batch_size, **where)
        else:
            batches = store.image_batches(cfg.site, images_per_batch, **where)
        for i, x in enumerate(batches):
            if i < skip:
                continue
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total_steps, lr, cfg.lr_decay)
            before = sae.tokens_since_fired.clone()
            stats = train_step(model, opt, x.to(device), extra_loss=extra_loss, prefix_weights=prefix_weights)
            if not math.isfinite(stats["fvu"]):  # before any checkpoint holds the NaN weights
                raise SystemExit(
                    f"Training diverged at step {step + 1}: the FVU is {stats['fvu']}. Lower --lr (this run "
                    f"used {lr:g}) and start again with another --work (its checkpoints hold this run)."
                )
            last_fvu = stats["fvu"]
            _sync_dead_tracking(sae, before, global_batch, world)
            step += 1
            tokens += global_batch
            bar.update(1)
            if rank == 0 and (step % cfg.log_every == 0 or step == 1):
                stats = {**stats, "dead_fraction": sae.dead_fraction(), "lr": opt.param_groups[0]["lr"]}
                row = {"step": step, "tokens": tokens, "seconds": round(time.time() - t0, 2), **stats}
                append_jsonl(metrics, row)
                bar.set_postfix(fvu=f"{stats['fvu']:.4f}", dead=f"{stats['dead_fraction']:.3f}")
            if rank == 0 and (step % cfg.checkpoint_every == 0 or step == total_steps):
                save_checkpoint(ckpt, {"sae": sae}, opt, step=step, tokens=tokens, kind="sae")
            if step >= total_steps:
                break
        batches.close()  # let go of its window of shards now, not when the evaluation is done
    bar.close()
    # The optimiser state is twice the SAE's size and its gradients once more; neither is needed
    # after the last checkpoint, and the evaluation below needs room for the folded copy.
    del opt
    sae.zero_grad(set_to_none=True)
    if world > 1:
        dist.barrier()
    result = {"steps": step, "tokens": tokens, "seconds_this_run": round(time.time() - t0, 1)}
    refused = None
    if rank == 0:
        sae.eval()
        final = sae.fold_normalization()
        if eval_shards:  # streamed: memory holds one batch of the held-out shards at a time
            result["held_out"] = reconstruction_metrics(final, store.iter_rows(cfg.site, eval_shards))
            append_jsonl(metrics, {"step": step, "tokens": tokens, "eval_fvu": result["held_out"]["fvu"]})
        refused = diverged(result.get("held_out", {}).get("fvu", last_fvu), final, lr)
        final.cfg = dataclasses.replace(
            final.cfg, extra={**final.cfg.extra, "training": asdict(cfg), **result}
        )
        if out is not None and refused is None:
            final.save(Path(out) / cfg.site)
        write_json(work / "result.json", result)
        plot_curves(metrics, work / "curves.png")
    if world > 1:
        dist.barrier()  # every rank waits for rank 0's evaluation and save, then all leave together
        dist.destroy_process_group()
    if refused is not None:
        raise SystemExit(refused + (f" Not exported to {Path(out) / cfg.site}." if out is not None else ""))
    return result


def diverged(fvu: float | None, sae: TopKSAE, lr: float) -> str | None:
    """Why a trained SAE must not be exported (NaN/inf weights, or an FVU above 1: worse than predicting
    every token by the mean), or None."""
    if not all(torch.isfinite(p).all() for p in sae.parameters()):
        return f"The trained SAE has NaN/inf weights: the run diverged. Lower --lr (this run used {lr:g})."
    if fvu is not None and not fvu <= 1:
        return (
            f"The trained SAE's FVU is {fvu:.4g}, worse than predicting every token by the mean (FVU 1): the "
            f"run diverged or learnt nothing. Lower --lr (this run used {lr:g}) and train again with another "
            "--work."
        )
    return None


def main(argv=None) -> None:
    cfg, args = dictionary_command(
        TrainConfig,
        argv,
        __doc__,
        work_help="checkpoints, metrics.jsonl, curves.png",
        out_help="dictionary folder: the SAE goes to OUT/<site>/",
    )
    result = train(cfg, args.work, args.out, args.device, overwrite=args.overwrite)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
