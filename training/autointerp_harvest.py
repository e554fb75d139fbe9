"""The autointerp pass over a harvest (`python -m training.harvest`) instead of fresh generations.

    python -m training.autointerp --acts runs/harvest --out runs/labels --work runs/labels_work \\
        --methods sae,itda --sites transformer_blocks.3.image

A harvest stores the residual stream of its sites for every prompt, at its steps, in
(prompt, step, token) row order; shard by shard it is reshaped to [steps, prompts, tokens, d] and fed
to the same accumulators as fresh generations. MLP neurons are not in a harvest (only residual
sites are), so "mlp" needs fresh generations. Images are not stored either: after the pass, the
images that some unit shows as a top example are generated again from their prompt and seed with the
harvest's model and generation arguments (the same images, as generation is seeded). Shapes prompts
carry their scene, so the ground truth (oracle, AUROC, coverage) works on a Shapes harvest too.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from fluxsae.activations import ActivationStore
from fluxsae.autointerp import examples as ex
from fluxsae.fileio import write_json


def harvest_pass(cfg, work, todo: list[tuple[str, str]]) -> None:
    """Like `training.autointerp.streaming_pass`, reading `cfg.acts`; writes the same work files."""
    import fluxsae
    from fluxsae.feature_stats import fingerprint

    store = ActivationStore(cfg.acts)
    info = store.config
    if any(m == "mlp" for _, m in todo):
        raise SystemExit(f"{cfg.acts} holds residual-stream sites only: MLP neurons need fresh generations "
                         "(drop --acts, or drop mlp from --methods)")  # fmt: skip
    missing = sorted({s for s, _ in todo} - set(store.sites))
    if missing:
        raise SystemExit(f"{cfg.acts} has no activations of {missing}; it has {store.sites}")
    steps = [int(s) for s in info["steps"]]
    prompts = store.prompts()
    jobs = []
    for site, method in todo:
        if method in ("sae", "itda"):
            d = fluxsae.load_dictionary(cfg.source, site=site, method=method)
            fn, fp = (lambda a, d=d: ex.dictionary_units(d, a)), fingerprint(d)
        else:
            r = ex.RandomDirections(cfg.random_units, store.dim(site), seed=cfg.seed)
            fn, fp = (lambda a, r=r: r(a)), f"random-{cfg.seed}"
        acc = None
        jobs.append([site, method, fn, fp, acc])
    for i in tqdm(range(len(store.shards)), desc="harvest shards", unit="shard"):
        by_site = {}
        for site in sorted({s for s, _ in todo}):
            acts, manifest = store.load(site, [i])
            by_site[site] = _prompt_major(acts, manifest, len(steps))
        for job in jobs:
            site, method, fn, fp, acc = job
            x, ids = by_site[site]
            units = fn(x)
            if acc is None:
                job[4] = acc = ex.UnitAccumulator(site, method, units.shape[-1], steps, k=cfg.top_k,
                                                  min_active_tokens=cfg.min_active_tokens, fingerprint=fp)
            acc.update(units, ids)
    meta = {"n_images": len(prompts), "harvest": str(cfg.acts), "generation": info.get("generation", {}),
            "cfg_pass": info.get("cfg_pass", "cond")}  # fmt: skip
    shown: set[int] = set()
    for site, method, _, _, acc in jobs:
        summary = acc.result(meta)
        (work / method / site).mkdir(parents=True, exist_ok=True)
        summary.save(work / method / site)
        shown |= {int(j) for j in summary.top_ids[:, : cfg.n_positives].flatten() if j >= 0}
    lines = [{"image_id": int(p["id"]), "prompt": p["prompt"], "seed": int(p["seed"]),
              "scene": p.get("scene"), "has_image": int(p["id"]) in shown} for p in prompts]  # fmt: skip
    _regenerate(info, [r for r in lines if r["has_image"]], work, cfg.batch_size)
    write_json(work / "images.json", lines)


def _prompt_major(acts: torch.Tensor, manifest: dict, n_steps: int) -> tuple[torch.Tensor, list[int]]:
    """A shard's rows [prompts * steps * tokens, d] -> ([steps, prompts, tokens, d], prompt ids)."""
    ids = manifest["prompt_id"]
    unique = torch.unique_consecutive(ids)
    n_prompts = len(unique)
    n_tokens, rest = divmod(acts.shape[0], n_prompts * n_steps)
    step = manifest["step"].reshape(n_prompts, n_steps, -1) if not rest else None
    if rest or not (step == step[:, :, :1]).all():
        raise SystemExit("a harvest shard is not in (prompt, step, token) order with every step of every "
                         "prompt; re-harvest it with `python -m training.harvest`")  # fmt: skip
    x = acts.float().reshape(n_prompts, n_steps, n_tokens, -1).permute(1, 0, 2, 3).contiguous()
    return x, unique.tolist()


def _regenerate(info: dict, lines: list[dict], work, batch_size: int) -> None:
    """Generate again the images of `lines` with the harvest's model and arguments (seeded: the same)."""
    import fluxsae

    if not lines:
        return
    pipe = fluxsae.load_pipeline(info["model"], quantize=info.get("quantization"),
                                 revision=info.get("revision"))  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    (work / "images").mkdir(parents=True, exist_ok=True)
    for start in tqdm(range(0, len(lines), batch_size), desc="images of top examples", unit="batch"):
        chunk = lines[start : start + batch_size]
        generators = [torch.Generator(pipe.device).manual_seed(r["seed"]) for r in chunk]
        with torch.no_grad():
            images = pipe([r["prompt"] for r in chunk], generator=generators, **info["generation"]).images
        for r, image in zip(chunk, images, strict=True):
            image.save(work / "images" / f"{r['image_id']:06d}.png")
