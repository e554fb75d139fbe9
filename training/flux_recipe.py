"""FLUX.1 at full size: one command from a checkpoint to published dictionaries and feature labels.

    python -m training.flux_recipe --work runs/flux1 --model black-forest-labs/FLUX.1-schnell \\
        --quantize nf4 --dataset opendiffusionai/cc12m-cleaned --column caption_llava_short \\
        --n-prompts 120000 --sites transformer_blocks.18.image --steps 0 --explainer http \\
        --publish-to user/flux1-schnell
    python -m training.flux_recipe --work runs/flux1_random --random-weights --device cuda ...  # no download

Stages, each one the command it names (printed before it runs, so any stage can be rerun by hand):
  model       --random-weights only: FLUX.1's real configs with random weights, saved as a pipeline folder
  harvest     `training.harvest`: the sites at the chosen steps, 256 px, prompts from a dataset column
  sae         `training.train_sae` per site: the reference work's 65,536 features, k 64, 30M tokens
  itda        `training.build_itda` per site: threshold 0.6, L0 32, up to 50k atoms, pruned at cosine 0.8
  autointerp  `training.autointerp` over a second, small harvest of other prompts (`--label-prompts`):
              its pass encodes every token densely, so it reads a few thousand images, not the training set
  publish     `training.publish`: the SAE repo, the ITDA repo and the label datasets (or --dry-run folders)
Before anything runs it prints tokens, disk (tokens x d x bytes per site) and a rough time per stage, and
refuses to start when the disk under --work cannot hold what is left to write. Kill it at any point and
run the same command again: finished stages are skipped (work/recipe/<stage>.done.json) and the stage in
progress resumes from its own checkpoints. A folder started with other settings is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from fluxsae.fileio import atomic_path, write_json
from fluxsae.sites import parse_site
from training.cli import add_config_arguments, config_from_args
from training.flux_plan import (
    check_disk,
    estimate,
    folder_bytes,
    geometry_of_configs,
    geometry_of_model,
    human_bytes,
    matmul_rate,
    stage_seconds,
    table,
)
from training.work import claim

STAGES = ("model", "harvest", "sae", "itda", "autointerp", "publish")


@dataclass(frozen=True)
class RecipeConfig:
    """One FLUX.1 run from a checkpoint to published artifacts (saved as WORK/recipe.json; a rerun must
    match it)."""

    work: str
    """Work folder: every stage's output, checkpoints and done markers. Rerun to resume."""
    model: str = "black-forest-labs/FLUX.1-schnell"
    """A FLUX.1 Hub id or a pipeline folder; with --random-weights the base whose configs are built."""
    random_weights: bool = False
    """Build the model from its real configs with random weights (no download), saved to WORK/model."""
    random_set: str | None = None
    """Space-separated COMPONENT.FIELD=VALUE config changes of the random model (values are JSON), e.g.
    'transformer.num_layers=2 transformer.num_single_layers=2 text_encoder_2.num_layers=2'."""
    random_seed: int = 0
    """Seed of the random weights."""
    quantize: Literal["nf4"] | None = None
    """nf4: 4-bit transformer (and T5 on CUDA) while harvesting; none: as stored (bf16 on CUDA)."""
    revision: str | None = None
    """Hub revision of the model."""
    device: str | None = None
    """Where models run (cuda, cpu); none: CUDA when there is one."""
    threads: int | None = None
    """Torch CPU threads; none: torch's default."""
    prompts: str | None = None
    """A text file of prompts, one per line (instead of --dataset)."""
    dataset: str | None = None
    """A Hugging Face dataset of captions."""
    column: str = "caption_llava_short"
    """The dataset's caption column."""
    split: str = "train"
    """The dataset's split."""
    n_prompts: int = 120_000
    """Prompts to harvest for training (120k x 256 tokens x 1 step = the reference's 30M tokens)."""
    sites: str = "transformer_blocks.18.image"
    """Comma-separated sites (the reference: transformer_blocks.18.image; also .9, single 9 and 18)."""
    steps: str = "0"
    """Denoising steps to keep: '0' (the reference's pure-noise step), '0-3', 'all'."""
    height: int = 256
    """Image height in pixels."""
    width: int = 256
    """Image width in pixels."""
    num_inference_steps: int | None = None
    """Denoising steps; none: the model's (schnell 4, dev 28)."""
    max_sequence_length: int | None = None
    """T5 tokens; none: the model's (schnell 256, dev 512)."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Storage dtype of the harvested activations."""
    batch_size: int = 16
    """Prompts per pipeline call."""
    prompts_per_shard: int = 64
    """Prompts per harvest shard."""
    seed: int = 0
    """Prompt i of the training harvest uses noise seed SEED + i; the SAE and ITDA seeds too."""
    n_features: int = 65_536
    """SAE width."""
    k: int = 64
    """SAE active features per token."""
    sae_tokens: int = 30_000_000
    """SAE training tokens per site."""
    sae_batch_size: int = 4096
    """SAE tokens per step."""
    normalization: Literal["none", "standardize", "pca"] = "standardize"
    """SAE input normalisation (the reference whitened with PCA)."""
    aux_k: int = 256
    """SAE AuxK: dead features per token in the auxiliary loss (0: off; at most --n-features)."""
    itda_k: int = 32
    """ITDA L0."""
    itda_threshold: float = 0.6
    """ITDA: add a token as an atom when its normalised error exceeds this."""
    itda_max_atoms: int | None = 50_000
    """ITDA: stop adding atoms at this many."""
    itda_prune_cosine: float | None = 0.8
    """ITDA: drop candidates with a cosine above this to a kept atom."""
    explainer: Literal["http", "vlm", "none"] = "http"
    """Autointerp explainer: http (FLUXSAE_AUTOINTERP_URL/MODEL/KEY), vlm (--vlm-model), none: no labels."""
    judge: Literal["http", "vlm"] | None = None
    """Autointerp judge; none: the explainer's backend."""
    vlm_model: str | None = None
    """Hub id or folder of the local vision-language model."""
    label_methods: tuple[str, ...] = ("sae",)
    """Dictionaries to label: sae, itda."""
    label_prompts: int = 2000
    """Prompts of the label harvest (the prompts after the training harvest's, other noise seeds)."""
    max_units: int | None = None
    """Label only the first N units per site and method; none: all."""
    label_workers: int = 4
    """Units labelled at once (HTTP: requests in flight)."""
    publish_to: str | None = None
    """Hub prefix: PREFIX-sae, PREFIX-itda and PREFIX-labels-<method> repos; none: stage only (dry run)."""
    dry_run: bool = False
    """Stage the repos in WORK/publish/ exactly as they would be uploaded, upload nothing."""
    estimate_only: bool = False
    """Print the estimate (and the disk check) and stop; nothing is written."""


def _device(cfg: RecipeConfig) -> torch.device:
    return torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _model_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def random_configs(cfg: RecipeConfig) -> dict[str, dict]:
    from fluxsae.flux import apply_overrides, flux1_configs, overrides_from

    try:
        return apply_overrides(flux1_configs(cfg.model), overrides_from((cfg.random_set or "").split()))
    except (KeyError, ValueError) as e:
        raise SystemExit(f"--random-weights: {e}") from None


def generation(cfg: RecipeConfig, guidance_embeds: bool) -> dict:
    from fluxsae.flux import DEV_GENERATION, SCHNELL_GENERATION

    gen = dict(DEV_GENERATION if guidance_embeds else SCHNELL_GENERATION)
    gen.update(height=cfg.height, width=cfg.width)
    for name in ("num_inference_steps", "max_sequence_length"):
        if getattr(cfg, name) is not None:
            gen[name] = getattr(cfg, name)
    return gen


def plan_of(cfg: RecipeConfig, gen: dict, device: torch.device) -> dict:
    from training.harvest import parse_steps

    sites = [str(parse_site(s.strip())) for s in cfg.sites.split(",") if s.strip()]
    if not sites:
        raise SystemExit("--sites names no site, e.g. transformer_blocks.18.image")
    bad = [m for m in cfg.label_methods if m not in ("sae", "itda")]
    if bad:
        raise SystemExit(f"--label-methods takes sae, itda; got {bad}")
    if not 0 < cfg.k <= cfg.n_features or not 0 <= cfg.aux_k <= cfg.n_features:
        raise SystemExit(
            f"--k ({cfg.k}) and --aux-k ({cfg.aux_k}) must lie in 1 / 0..--n-features ({cfg.n_features})."
        )
    labels = cfg.label_methods if cfg.explainer != "none" else ()
    return {
        "sites": sites,
        "steps": parse_steps(cfg.steps, gen["num_inference_steps"]),
        "generation": gen,
        "dtype": cfg.dtype,
        "n_prompts": _n_prompts(cfg),
        "n_features": cfg.n_features,
        "k": cfg.k,
        "sae_tokens": cfg.sae_tokens,
        "itda_k": cfg.itda_k,
        "itda_max_atoms": cfg.itda_max_atoms,
        "label_methods": labels,
        "label_prompts": cfg.label_prompts,
        "random_weights": cfg.random_weights,
        "model_dtype": str(_model_dtype(device)).removeprefix("torch."),
    }


def _n_prompts(cfg: RecipeConfig) -> int:
    """Prompts the training harvest will read: --n-prompts, or fewer lines of a --prompts file."""
    if cfg.prompts and Path(cfg.prompts).is_file():
        lines = [line for line in Path(cfg.prompts).read_text().splitlines() if line.strip()]
        return min(cfg.n_prompts, len(lines))
    return cfg.n_prompts


class Recipe:
    """The stages of one run (see the module docstring); `run()` does what is left."""

    def __init__(self, cfg: RecipeConfig):
        self.cfg = cfg
        self.work = Path(cfg.work)
        self.device = _device(cfg)
        if cfg.random_weights:
            self.configs = random_configs(cfg)
            self.geometry = geometry_of_configs(self.configs)
        else:
            self.configs = None
            self.geometry = geometry_of_model(cfg.model)
        self.gen = generation(cfg, self.geometry.guidance_embeds)
        self.plan = plan_of(cfg, self.gen, self.device)
        self.sites = self.plan["sites"]
        self.image_sites = [s for s in self.sites if parse_site(s).stream == "image"]
        self.model = str(self.work / "model") if cfg.random_weights else cfg.model

    # -- bookkeeping ---------------------------------------------------------------------------

    def marker(self, name: str) -> Path:
        return self.work / "recipe" / f"{name}.done.json"

    def done(self, name: str) -> bool:
        return self.marker(name).is_file()

    def finish(self, name: str, result: dict | None = None) -> None:
        write_json(self.marker(name), {"finished": time.strftime("%Y-%m-%d %H:%M:%S"), **(result or {})})

    def stage_done(self, stage: str) -> bool:
        return all(self.done(name) for name in self.items(stage))

    def items(self, stage: str) -> list[str]:
        """The done markers a stage consists of (one per site, method or repo)."""
        labels = self.plan["label_methods"]
        return {
            "model": ["model"] if self.cfg.random_weights else [],
            "harvest": ["harvest"],
            "sae": [f"sae-{s}" for s in self.sites],
            "itda": [f"itda-{s}" for s in self.sites],
            "autointerp": ["label-harvest", *(f"labels-{m}" for m in labels)]
            if self.image_sites and labels
            else [],
            "publish": ["publish-sae", "publish-itda"]
            + [f"publish-labels-{m}" for m in labels if self.image_sites],
        }[stage]

    def run_command(self, name: str, module, argv: list[str]) -> None:
        """Run `module.main(argv)` in this process, after printing it as a command line."""
        print(f"\n== {name}: python -m {module.__name__} {shlex.join(argv)}", flush=True)
        module.main(argv)

    # -- the plan ------------------------------------------------------------------------------

    def preflight(self) -> dict:
        """Print the estimate and refuse (SystemExit) a run the disk cannot hold. Returns the summary."""
        estimates = estimate(self.plan, self.geometry)
        done = {s for s in STAGES if self.stage_done(s)}
        if self.done("label-harvest"):
            done.add("label harvest")
        dtype = _model_dtype(self.device)
        rates = {"float32": matmul_rate(self.device, torch.float32)}
        rates["model"] = rates["float32"] if dtype == torch.float32 else matmul_rate(self.device, dtype)
        probe = f"{rates['float32'] / 1e12:.2f} TFLOP/s (float32)"
        if dtype != torch.float32:
            probe = f"{rates['model'] / 1e12:.2f} TFLOP/s ({str(dtype).removeprefix('torch.')}), {probe}"
        print(
            f"FLUX.1 recipe in {self.work}: {self.model} (d {self.geometry.width}, "
            f"{self.geometry.transformer_params / 1e9:.2f}B transformer parameters) on {self.device}; "
            f"matmul probe {probe}"
        )
        print(table(estimates, rates, done))
        already = {
            "harvest": folder_bytes(self.work / "harvest"),
            "label harvest": folder_bytes(self.work / "labels_harvest"),
            "model": folder_bytes(self.work / "model"),
        }
        need = check_disk(estimates, self.work, done, already)
        seconds = sum(stage_seconds(e, rates) for e in estimates if e.stage not in done)
        print(
            f"left to write: {human_bytes(need)}; left to compute: about {seconds / 3600:.1f} h", flush=True
        )
        return {e.stage: dataclasses.asdict(e) for e in estimates}

    def run(self) -> None:
        cfg = self.cfg
        estimates = self.preflight()
        if cfg.estimate_only:
            return
        claim(self.work, "recipe.json", cfg, what="a FLUX.1 recipe run")
        write_json(self.work / "recipe" / "estimate.json", estimates)
        for stage in STAGES:
            if not self.items(stage):
                continue
            if self.stage_done(stage):
                print(f"\n== {stage}: done (markers in {self.work / 'recipe'})")
                continue
            getattr(self, f"stage_{stage}")()
        print(f"\nAll stages done: {self.work}")

    # -- stages --------------------------------------------------------------------------------

    def stage_model(self) -> None:
        from fluxsae.flux import random_flux_pipeline

        g, dtype = self.geometry, _model_dtype(self.device)
        need = sum(g.params.values()) * torch.empty(0, dtype=dtype).element_size()
        if self.device.type == "cpu":
            memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            if need > 0.7 * memory:
                raise SystemExit(
                    f"--random-weights: this model is {human_bytes(need)} in {dtype} and this machine has "
                    f"{human_bytes(memory)} of memory. Build it on a GPU (--device cuda) or reduce it with "
                    "--random-set (e.g. 'transformer.num_layers=2 transformer.num_single_layers=2')."
                )
        print(
            f"\n== model: random weights from {self.cfg.model}'s configs, {human_bytes(need)} "
            f"({dtype}, {self.device}) -> {self.model}",
            flush=True,
        )
        words = _prompt_words(self.cfg, self.configs)
        pipe = random_flux_pipeline(
            self.cfg.model,
            device=self.device,
            dtype=dtype,
            seed=self.cfg.random_seed,
            overrides=_overrides(self.cfg),
            words=words,
        )
        with atomic_path(self.model, is_dir=True) as tmp:
            pipe.save_pretrained(tmp)
            write_json(
                tmp / "fluxsae_random.json",
                {"base": self.cfg.model, "seed": self.cfg.random_seed, "configs": self.configs},
            )
        del pipe
        self.finish("model", {"bytes": folder_bytes(Path(self.model))})

    def harvest_argv(self, out: Path, n_prompts: int, skip: int, seed: int, per_shard: int) -> list[str]:
        cfg, g = self.cfg, self.gen
        if cfg.prompts:
            source = {"prompts": cfg.prompts}
        elif cfg.dataset:
            source = {"dataset": cfg.dataset, "column": cfg.column, "split": cfg.split}
        else:
            raise SystemExit(
                "Say where the captions come from: --dataset NAME --column COL, or --prompts FILE."
            )
        generation = {k: g[k] for k in ("height", "width", "num_inference_steps", "max_sequence_length",
                                         "guidance_scale")}  # fmt: skip
        return _argv(
            model=self.model, sites=",".join(self.sites), steps=cfg.steps, out=out, n_prompts=n_prompts,
            skip_prompts=skip or None, seed=seed, dtype=cfg.dtype, prompts_per_shard=per_shard,
            batch_size=cfg.batch_size, **generation, **source, quantize=cfg.quantize, revision=cfg.revision,
            threads=cfg.threads, device=cfg.device,
        )  # fmt: skip

    def stage_harvest(self) -> None:
        from training import harvest

        argv = self.harvest_argv(
            self.work / "harvest", self.plan["n_prompts"], 0, self.cfg.seed, self.cfg.prompts_per_shard
        )
        self.run_command("harvest", harvest, argv)
        self.finish("harvest")

    def _dictionary_argv(self, site: str, out: str, work: str, **flags) -> list[str]:
        return _argv(
            acts=self.work / "harvest", device=self.device, seed=self.cfg.seed, threads=self.cfg.threads,
            site=site, out=self.work / out, work=self.work / work / site, **flags,
        )  # fmt: skip

    def stage_sae(self) -> None:
        from training import train_sae

        cfg = self.cfg
        self._write_run_record(self.work / "saes")
        for site in self.sites:
            if self.done(f"sae-{site}"):
                continue
            argv = self._dictionary_argv(
                site, "saes", "sae_work", n_features=cfg.n_features, k=cfg.k, tokens=cfg.sae_tokens,
                batch_size=cfg.sae_batch_size, normalization=cfg.normalization, aux_k=cfg.aux_k,
            )  # fmt: skip
            self.run_command(f"sae {site}", train_sae, argv)
            self.finish(f"sae-{site}", _read_json(self.work / "sae_work" / site / "result.json"))

    def stage_itda(self) -> None:
        from training import build_itda

        cfg = self.cfg
        self._write_run_record(self.work / "itda")
        for site in self.sites:
            if self.done(f"itda-{site}"):
                continue
            argv = self._dictionary_argv(
                site, "itda", "itda_work", k=cfg.itda_k, threshold=cfg.itda_threshold, eval_tokens=65536,
                max_atoms=_opt(cfg.itda_max_atoms), prune_cosine=_opt(cfg.itda_prune_cosine),
            )  # fmt: skip
            self.run_command(f"itda {site}", build_itda, argv)
            self.finish(f"itda-{site}", _read_json(self.work / "itda_work" / site / "result.json"))

    def stage_autointerp(self) -> None:
        from training import autointerp, harvest

        cfg = self.cfg
        if not self.done("label-harvest"):
            argv = self.harvest_argv(
                self.work / "labels_harvest",
                cfg.label_prompts,
                self.plan["n_prompts"],
                cfg.seed + 10_000_000,
                min(cfg.prompts_per_shard, 16),
            )
            self.run_command("label harvest", harvest, argv)
            self.finish("label-harvest")
        for method in self.plan["label_methods"]:
            if self.done(f"labels-{method}"):
                continue
            source = self.work / ("saes" if method == "sae" else "itda")
            argv = _argv(
                acts=self.work / "labels_harvest", source=source, sites=",".join(self.image_sites),
                methods=method, explainer=cfg.explainer, judge=cfg.judge, vlm_model=cfg.vlm_model,
                out=self.work / "labels" / method, work=self.work / "labels_work" / method,
                batch_size=cfg.batch_size, max_workers=cfg.label_workers, max_units=_opt(cfg.max_units),
            )  # fmt: skip
            self.run_command(f"autointerp {method}", autointerp, argv)
            self.finish(f"labels-{method}")

    def stage_publish(self) -> None:
        from training import publish

        cfg = self.cfg
        prefix = cfg.publish_to or f"local/{self.work.resolve().name}"
        dry = cfg.dry_run or cfg.publish_to is None
        jobs = [
            ("publish-sae", "model", f"{prefix}-sae", self.work / "saes"),
            ("publish-itda", "model", f"{prefix}-itda", self.work / "itda"),
        ]
        if self.image_sites:
            jobs += [
                (f"publish-labels-{m}", "dataset", f"{prefix}-labels-{m}", self.work / "labels" / m)
                for m in self.plan["label_methods"]
            ]
        for name, what, repo, source in jobs:
            if self.done(name):
                continue
            argv = [what, repo, "--from", str(source)]
            if dry:
                staged = self.work / "publish" / name.removeprefix("publish-")
                shutil.rmtree(staged, ignore_errors=True)  # a staging a kill left half-written
                argv += ["--dry-run", str(staged)]
            self.run_command(name, publish, argv)
            self.finish(name, {"repo": repo, "dry_run": dry})

    def _write_run_record(self, folder: Path) -> None:
        """folder/config.json: the command and settings, which `training.publish` puts in the root config."""
        settings = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k not in ("work", "prompts")}
        write_json(
            folder / "config.json", {"command": "python -m training.flux_recipe", "settings": settings}
        )


def _opt(value) -> str:
    return "none" if value is None else str(value)


def _argv(**flags) -> list[str]:
    """{"n_prompts": 6, "quantize": None} -> ["--n-prompts", "6"]: a flag per value that is not None."""
    return [x for k, v in flags.items() if v is not None for x in (f"--{k.replace('_', '-')}", str(v))]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _overrides(cfg: RecipeConfig) -> dict:
    from fluxsae.flux import overrides_from

    return overrides_from((cfg.random_set or "").split())


def _prompt_words(cfg: RecipeConfig, configs: dict) -> list[str] | None:
    """The tokenizer vocabulary of a random model: the words of a --prompts file (commonest first, as many
    as the text encoders' vocabularies hold), else the tiny pipeline's words."""
    from collections import Counter

    from fluxsae.tiny import SPECIAL_TOKENS, TINY_WORDS

    if not (cfg.prompts and Path(cfg.prompts).is_file()):
        return None
    counts = Counter(re.findall(r"\w+|[^\w\s]+", Path(cfg.prompts).read_text().lower()))
    room = min(configs["text_encoder"]["vocab_size"], configs["text_encoder_2"]["vocab_size"])
    room -= len(SPECIAL_TOKENS) + len(TINY_WORDS)
    return list(TINY_WORDS) + [w for w, _ in counts.most_common() if w not in TINY_WORDS][: max(0, room)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m training.flux_recipe",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(p, RecipeConfig)
    cfg = config_from_args(RecipeConfig, p.parse_args(argv))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not cfg.random_weights and cfg.random_set:
        p.error("--random-set changes the random model: pass --random-weights too")
    if cfg.explainer == "vlm" and not cfg.vlm_model:
        p.error("--explainer vlm needs --vlm-model")
    Recipe(cfg).run()


if __name__ == "__main__":
    sys.exit(main())
