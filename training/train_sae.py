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

import argparse
import dataclasses
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from tqdm import tqdm

from fluxsae.activations import ActivationStore, split_shards
from fluxsae.evaluate import reconstruction_metrics
from fluxsae.fileio import load_tensors, save_tensors, write_json
from fluxsae.sae import SAEConfig, TopKSAE, make_optimizer, train_step
from training.cli import add_config_arguments, config_from_args

logger = logging.getLogger("training.train_sae")


@dataclass(frozen=True)
class TrainConfig:
    """One SAE training run (saved as `--work/train_config.json`; a resumed run must match it)."""

    acts: str
    """Harvest folder (`python -m training.harvest`)."""
    site: str
    """Site to train on, one of the harvest's sites."""
    n_features: int = 2048
    """Dictionary width."""
    k: int = 16
    """Active features per token."""
    tokens: int = 10_000_000
    """Training tokens in total (all processes together); epochs repeat the data as needed."""
    batch_size: int = 4096
    """Tokens per step and per process: the global batch is batch_size x world size."""
    lr: float = 0.0
    """Adam learning rate; 0 picks 2e-4 / sqrt(n_features / 2**14) as sparsify does."""
    normalization: Literal["none", "standardize", "pca"] = "standardize"
    """Input normalisation learnt from the first `norm_sample` training tokens, folded in on export."""
    norm_sample: int = 65_536
    aux_k: int = 256
    """AuxK: dead features used to model the residual (0: off)."""
    dead_after_tokens: int = 2_000_000
    """A feature that has not fired for this many tokens counts as dead."""
    held_out: float = 0.1
    """Share of shards kept for evaluation."""
    seed: int = 0
    log_every: int = 20
    checkpoint_every: int = 200


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def build_sae(cfg: TrainConfig, store: ActivationStore, train_shards: list[int]) -> TopKSAE:
    """A fresh SAE with its normalisation fitted on the first `norm_sample` training tokens."""
    sample, _ = store.load(cfg.site, train_shards[: max(1, len(train_shards))])
    g = torch.Generator().manual_seed(cfg.seed)
    sample = sample[torch.randperm(len(sample), generator=g)[: cfg.norm_sample]]
    harvest = store.config
    gen = harvest["generation"]
    sae_cfg = SAEConfig(
        d_in=store.dim(cfg.site), n_features=cfg.n_features, k=cfg.k, site=cfg.site,
        base_model=harvest["model"], base_revision=harvest.get("revision"), normalization=cfg.normalization,
        aux_k=cfg.aux_k, dead_after_tokens=cfg.dead_after_tokens,
        mean_token_norm=sample.norm(dim=-1).mean().item(), steps=tuple(harvest["steps"]),
        resolution=(gen["height"], gen["width"]), dtype=harvest["dtype"],
        quantization=harvest.get("quantization"),
    )  # fmt: skip
    torch.manual_seed(cfg.seed)
    sae = TopKSAE(sae_cfg)
    sae.fit_normalization(sample, cfg.normalization)
    sae.init_b_dec_from_data(sample)
    return sae


def _sync_dead_tracking(sae: TopKSAE, before: torch.Tensor, global_tokens: int, world: int) -> None:
    """Make `tokens_since_fired` global: a feature fired if it fired on any process."""
    if world == 1:
        return
    fired = (sae.tokens_since_fired < before + global_tokens // world).to(torch.int32)
    dist.all_reduce(fired, op=dist.ReduceOp.MAX)
    sae.tokens_since_fired.copy_(torch.where(fired.bool(), torch.zeros_like(before), before + global_tokens))


def save_checkpoint(path: Path, sae: TopKSAE, opt, step: int, tokens: int) -> None:
    tensors = {f"sae/{k}": v for k, v in sae.state_dict().items()}
    state = opt.state_dict()
    for pid, s in state["state"].items():
        for k, v in s.items():
            tensors[f"optim/{pid}/{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    save_tensors(path, tensors, {"step": step, "tokens": tokens, "param_groups": state["param_groups"]})


def load_checkpoint(path: Path, sae: TopKSAE, opt) -> tuple[int, int]:
    tensors, meta = load_tensors(path)
    sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae/")})
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            _, pid, name = k.split("/", 2)
            state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta["step"], meta["tokens"]


def plot_curves(metrics_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
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


def train(cfg: TrainConfig, work: Path, out: Path | None, device: str = "cpu") -> dict:
    rank, world = _distributed()
    store = ActivationStore(cfg.acts)
    train_shards, eval_shards = split_shards(len(store.shards), cfg.held_out)
    if not train_shards:
        raise SystemExit(f"{cfg.acts} has no shards to train on; harvest first.")
    work.mkdir(parents=True, exist_ok=True)
    saved = work / "train_config.json"
    if saved.exists() and json.loads(saved.read_text()) != json.loads(json.dumps(asdict(cfg))):
        raise SystemExit(
            f"{work} holds a run with other settings ({saved}); pass another --work or delete it."
        )
    if rank == 0:
        write_json(saved, asdict(cfg))

    sae = build_sae(cfg, store, train_shards).to(device)
    lr = cfg.lr or 2e-4 / (cfg.n_features / 2**14) ** 0.5
    opt = make_optimizer(sae, lr)
    ckpt = work / "checkpoint.safetensors"
    step, tokens = 0, 0
    if ckpt.exists():
        step, tokens = load_checkpoint(ckpt, sae, opt)
        logger.info("resuming at step %d (%d tokens)", step, tokens)
    model = torch.nn.parallel.DistributedDataParallel(sae, broadcast_buffers=False) if world > 1 else sae
    global_batch = cfg.batch_size * world
    per_epoch = store.steps_per_epoch(cfg.site, cfg.batch_size, world, train_shards)
    if per_epoch == 0:
        raise SystemExit(f"Fewer training tokens than one global batch ({global_batch}); harvest more.")
    total_steps = cfg.tokens // global_batch
    metrics = open(work / "metrics.jsonl", "a") if rank == 0 else None
    bar = tqdm(total=total_steps, initial=step, desc=f"SAE {cfg.site}", disable=rank != 0, unit="step")
    t0 = time.time()
    while step < total_steps:
        epoch, skip = divmod(step, per_epoch)
        batches = store.batches(cfg.site, cfg.batch_size, shards=train_shards, seed=cfg.seed, epoch=epoch,
                                rank=rank, world_size=world)  # fmt: skip
        for i, x in enumerate(batches):
            if i < skip:
                continue
            before = sae.tokens_since_fired.clone()
            stats = train_step(model, opt, x.to(device))
            _sync_dead_tracking(sae, before, global_batch, world)
            step += 1
            tokens += global_batch
            bar.update(1)
            if rank == 0 and (step % cfg.log_every == 0 or step == 1):
                stats = {**stats, "dead_fraction": sae.dead_fraction()}
                row = {"step": step, "tokens": tokens, "seconds": round(time.time() - t0, 2), **stats}
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                bar.set_postfix(fvu=f"{stats['fvu']:.4f}", dead=f"{stats['dead_fraction']:.3f}")
            if rank == 0 and (step % cfg.checkpoint_every == 0 or step == total_steps):
                save_checkpoint(ckpt, sae, opt, step, tokens)
            if step >= total_steps:
                break
    bar.close()
    if world > 1:
        dist.barrier()
    result = {"steps": step, "tokens": tokens, "seconds_this_run": round(time.time() - t0, 1)}
    if rank == 0:
        sae.eval()
        final = sae.fold_normalization()
        if eval_shards:
            x, _ = store.load(cfg.site, eval_shards)
            result["held_out"] = reconstruction_metrics(final, x)
            metrics.write(
                json.dumps({"step": step, "tokens": tokens, "eval_fvu": result["held_out"]["fvu"]}) + "\n"
            )
        metrics.close()
        plot_curves(work / "metrics.jsonl", work / "curves.png")
        final.cfg = dataclasses.replace(
            final.cfg, extra={**final.cfg.extra, "training": asdict(cfg), **result}
        )
        if out is not None:
            final.save(out / cfg.site)
        write_json(work / "result.json", result)
    if world > 1:
        dist.barrier()  # every rank waits for rank 0's evaluation and save, then all leave together
        dist.destroy_process_group()
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="checkpoints, metrics.jsonl, curves.png")
    p.add_argument("--out", type=Path, default=None, help="dictionary folder: the SAE goes to OUT/<site>/")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    add_config_arguments(p, TrainConfig)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from_args(TrainConfig, args)
    result = train(cfg, args.work, args.out, args.device)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
