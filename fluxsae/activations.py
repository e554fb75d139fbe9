"""Harvested activations on disk: sharded safetensors with a per-row manifest.

A harvest folder (written by `python -m training.harvest`):

    harvest.json                     what was harvested: model, sites, steps, dtype, generation args
    prompts.jsonl                    one line per prompt: {"id", "prompt", "seed", ...}
    shards/shard-000000.safetensors  prompts [i * P, (i + 1) * P) of the prompt list
    manifest.json                    the shards and their row counts, written last: a harvest without
                                     it (killed, or still running) is not read

Each shard holds, for every site, `acts/<site>` [rows, d] in the storage dtype, and for each
stream ("image", "text") the manifest of its rows, one value per row:
`<stream>/prompt_id`, `<stream>/seed`, `<stream>/step` (denoising step index),
`<stream>/timestep` (sigma in [0, 1], the transformer's `timestep` input), `<stream>/token`
(index in the stream), `<stream>/row`, `<stream>/col` (the token's cell in the image grid;
-1 for text tokens). Rows are ordered prompt, step, token. A shard file is written atomically,
so it exists only when complete: a killed harvest resumes at the first missing shard. `manifest.json`
is written once every shard is there, and `ActivationStore` checks it against the shards and the
prompts: training on a harvest that is half done, or lost a shard, is refused with what to do.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from fluxsae.fileio import save_tensors, write_json
from fluxsae.sites import parse_site

MANIFEST_FIELDS = ("prompt_id", "seed", "step", "timestep", "token", "row", "col")
MANIFEST_FILE = "manifest.json"
STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
EPOCH_SEED_STRIDE = 1_000_003
"""`batches` shuffles epoch e of seed s with seed s * EPOCH_SEED_STRIDE + e: a prime, so no two
(seed, epoch) pairs of a run share a shuffle."""
_BLOCK_ROWS = 16_384
"""Rows read from a shard at once (96 MiB of bf16 at FLUX.1's width): bounds the memory of reading,
whatever a shard's size."""


class ActivationStoreError(ValueError):
    """A harvest folder that cannot be read as asked."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.safetensors"


def stream_rows(
    prompt_ids: list[int], seeds: list[int], steps: list[int], sigmas: list[float], n_tokens: int,
    grid: tuple[int, int] | None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """The manifest of `len(prompt_ids) x len(steps) x n_tokens` rows in (prompt, step, token) order.

    `grid` = (rows, cols) of the image token grid, or None for text tokens (row = col = -1).
    """
    n_p, n_s = len(prompt_ids), len(steps)
    shape = (n_p, n_s, n_tokens)

    def expand(values, dim, dtype):
        view = [1, 1, 1]
        view[dim] = -1
        return torch.tensor(values, dtype=dtype).view(view).expand(shape).reshape(-1)

    token = torch.arange(n_tokens, dtype=torch.int32)
    if grid is not None:
        if grid[0] * grid[1] != n_tokens:
            raise ValueError(
                f"A {grid[0]}x{grid[1]} token grid has {grid[0] * grid[1]} tokens, not {n_tokens}."
            )
        row, col = token // grid[1], token % grid[1]
    else:
        row = col = torch.full_like(token, -1)
    return {
        "prompt_id": expand(prompt_ids, 0, torch.int64),
        "seed": expand(seeds, 0, torch.int64),
        "step": expand(steps, 1, torch.int32),
        "timestep": expand(sigmas, 1, torch.float32),
        "token": expand(token.tolist(), 2, torch.int32),
        "row": expand(row.tolist(), 2, torch.int32),
        "col": expand(col.tolist(), 2, torch.int32),
    }


def write_shard(path: Path, acts: dict[str, torch.Tensor], manifests: dict[str, dict], meta: dict) -> None:
    """Write one shard atomically. `acts[site]` [rows, d]; `manifests[stream][field]` [rows]."""
    tensors = {f"acts/{site}": a.contiguous() for site, a in acts.items()}
    for stream, fields in manifests.items():
        for name, values in fields.items():
            tensors[f"{stream}/{name}"] = values.contiguous()
    for site, a in acts.items():
        stream = parse_site(site).stream
        if a.shape[0] != manifests[stream]["prompt_id"].shape[0]:
            raise ValueError(f"{site}: {a.shape[0]} rows but the {stream} manifest has a different count.")
    save_tensors(path, tensors, meta)


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    index: int
    prompts: tuple[int, int]
    """[start, end) of the prompt ids it holds."""
    rows: dict
    """stream -> number of rows."""


class ActivationStore:
    """Read a harvest folder: whole shards, or rows streamed with bounded memory.

    store = ActivationStore("runs/harvest")
    acts, manifest = store.load("transformer_blocks.3.image", shards=range(0, 10))   # all in memory
    for x in store.batches(site, batch_size=4096, seed=0, rank=0, world_size=1): ...  # shuffled
    for x in store.image_batches(site, images_per_batch=64, seed=0): ...  # whole images, shuffled
    for x in store.iter_rows(site, shards=[8, 9]): ...                   # in order, one batch at a time
    sample = store.sample_rows(site, shards=range(8), n=65_536, seed=0)  # only the sampled rows read
    """

    def __init__(self, folder: str | Path, *, complete: bool = True):
        """`complete`: refuse a harvest whose manifest.json is missing or disagrees with its shards
        (False reads whatever shards are there: for the harvest itself, while it runs)."""
        self.folder = Path(folder)
        config_path = self.folder / "harvest.json"
        if not config_path.is_file():
            raise ActivationStoreError(
                f"{self.folder} is not a harvest folder: {config_path} is missing. "
                "Create one with `python -m training.harvest --out FOLDER ...`."
            )
        try:
            self.config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ActivationStoreError(f"{config_path} is not valid JSON ({e}).") from e
        self.shards = self._scan()
        if complete:
            self._check_complete()

    def _check_complete(self) -> None:
        """ActivationStoreError unless manifest.json (written last) lists exactly the shards there, with
        their rows, and they hold every prompt of harvest.json."""
        path = self.folder / MANIFEST_FILE
        again = "run the same `python -m training.harvest` command again: it redoes what is missing"
        if not path.is_file():
            raise ActivationStoreError(
                f"{self.folder} is an unfinished harvest: {path} is missing (it is written last, once "
                f"every shard is there; {len(self.shards)} shard(s) so far). If the harvest is not still "
                f"running, {again}."
            )
        try:
            listed = {Path(s["file"]).name: s for s in json.loads(path.read_text())["shards"]}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ActivationStoreError(f"{path} is unreadable ({e}); {again}.") from e
        found = {s.path.name: s for s in self.shards}
        lost, unlisted = sorted(set(listed) - set(found)), sorted(set(found) - set(listed))
        if lost:
            raise ActivationStoreError(
                f"{self.folder}: shard(s) {', '.join(lost)} listed in {path.name} are missing; {again}."
            )
        if unlisted:
            raise ActivationStoreError(
                f"{self.folder}: shard(s) {', '.join(unlisted)} are not listed in {path.name} (left by "
                f"another harvest, or a harvest still running); {again}."
            )
        for name, shard in found.items():
            if listed[name].get("rows") != shard.rows:
                raise ActivationStoreError(
                    f"{shard.path}: holds rows {shard.rows} but {path.name} says {listed[name].get('rows')}; "
                    f"the shard was replaced; delete it and {again}."
                )
        covered = sorted(s.prompts for s in self.shards)
        n_prompts = self.config.get("n_prompts")
        ends = [0] + [end for _, end in covered]
        if [start for start, _ in covered] != ends[:-1] or (n_prompts is not None and ends[-1] < n_prompts):
            raise ActivationStoreError(
                f"{self.folder}: its shards hold prompts {covered}, not every prompt 0..{n_prompts} of "
                f"harvest.json once; {again}."
            )

    def _scan(self) -> list[ShardInfo]:
        shards = []
        for path in sorted((self.folder / "shards").glob("shard-*.safetensors")):
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            except Exception as e:  # safetensors raises its own error types for torn headers
                raise ActivationStoreError(
                    f"Shard {path} is unreadable ({e}); delete it and run the harvest again to redo it."
                ) from e
            shards.append(ShardInfo(path, int(meta["index"]), tuple(meta["prompts"]), meta["rows"]))
        return shards

    @property
    def sites(self) -> list[str]:
        return list(self.config["sites"])

    def dim(self, site: str) -> int:
        return int(self.config["dims"][self._check_site(site)])

    def _check_site(self, site: str) -> str:
        site = str(site)
        if site not in self.config["sites"]:
            raise ActivationStoreError(
                f"Site {site!r} was not harvested in {self.folder}; it has {self.config['sites']}."
            )
        return site

    def n_rows(self, site: str) -> int:
        stream = parse_site(self._check_site(site)).stream
        return sum(s.rows[stream] for s in self.shards)

    def prompts(self) -> list[dict]:
        """Every line of prompts.jsonl: {"id", "prompt", "seed", ...} (shapes prompts carry "scene")."""
        path = self.folder / "prompts.jsonl"
        try:
            with open(path, encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ActivationStoreError(
                f"{path} is unreadable ({e}); run the same `python -m training.harvest` command again to "
                "rewrite it."
            ) from e

    def load(
        self, site: str, shards: Iterable[int] | None = None, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Activations [rows, d] of the chosen shards (positions in `self.shards`; all by default) and
        their manifest {field: [rows]}."""
        site = self._check_site(site)
        stream = parse_site(site).stream
        chosen = [self.shards[i] for i in (range(len(self.shards)) if shards is None else shards)]
        if not chosen:
            raise ActivationStoreError(f"No shards chosen (the folder has {len(self.shards)}).")
        acts, manifest = [], {k: [] for k in MANIFEST_FIELDS}
        for shard in chosen:
            with safe_open(str(shard.path), framework="pt") as f:
                acts.append(f.get_tensor(f"acts/{site}").to(dtype))
                for k in MANIFEST_FIELDS:
                    manifest[k].append(f.get_tensor(f"{stream}/{k}"))
        return torch.cat(acts), {k: torch.cat(v) for k, v in manifest.items()}

    def read_rows(
        self, site: str, shard: int, start: int = 0, stop: int | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Rows [start, stop) [n, d] of one shard (a position in `self.shards`), reading only those rows
        from disk; `dtype` None keeps the storage dtype."""
        site = self._check_site(site)
        with safe_open(str(self.shards[shard].path), framework="pt") as f:
            rows = f.get_slice(f"acts/{site}")[start:stop]
        return rows if dtype is None else rows.to(dtype)

    def iter_rows(
        self, site: str, shards: Iterable[int] | None = None, batch_size: int = 8192,
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[torch.Tensor]:  # fmt: skip
        """The rows of `shards` (all by default) in order, as batches [<= batch_size, d] read one at a
        time: memory holds one batch, whatever the size of the harvest."""
        stream = parse_site(self._check_site(site)).stream
        for i in range(len(self.shards)) if shards is None else shards:
            n = self.shards[i].rows[stream]
            for start in range(0, n, batch_size):
                yield self.read_rows(site, i, start, min(start + batch_size, n), dtype)

    def sample_rows(
        self, site: str, shards: list[int], n: int, seed: int, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """`n` random rows [min(n, rows), d] of `shards`, reading only those rows.

        The sample is `concatenation[torch.randperm(rows, generator=manual_seed(seed))[:n]]` over the
        concatenation of the shards in the given order, the same rows in the same order as drawing
        from `load(site, shards)`, without holding more than the sample in memory.
        """
        stream = parse_site(self._check_site(site)).stream
        sizes = [self.shards[i].rows[stream] for i in shards]
        picked = torch.randperm(sum(sizes), generator=torch.Generator().manual_seed(seed))[:n]
        out = torch.empty(len(picked), self.dim(site), dtype=dtype)
        offset = 0
        for shard, size in zip(shards, sizes, strict=True):
            where = ((picked >= offset) & (picked < offset + size)).nonzero().squeeze(1)
            local = picked[where] - offset
            local, order = local.sort()
            where = where[order]
            for lo in range(0, size, _BLOCK_ROWS):  # safetensors maps the file: only touched rows are read
                inside = (local >= lo) & (local < lo + _BLOCK_ROWS)
                if inside.any():
                    block = self.read_rows(site, shard, lo, min(lo + _BLOCK_ROWS, size))
                    out[where[inside]] = block[local[inside] - lo].to(dtype)
            offset += size
        return out

    def _window(self, site: str, shards: list[int], with_manifest: bool):
        """The rows of `shards` concatenated, in the storage dtype (half the memory of float32 for a
        bf16 harvest), and their manifest (None unless asked)."""
        stream = parse_site(site).stream
        sizes = [self.shards[i].rows[stream] for i in shards]
        window, offset = None, 0
        for shard, size in zip(shards, sizes, strict=True):
            for lo in range(0, size, _BLOCK_ROWS):
                block = self.read_rows(site, shard, lo, min(lo + _BLOCK_ROWS, size))
                if window is None:
                    window = torch.empty(sum(sizes), block.shape[1], dtype=block.dtype)
                window[offset + lo : offset + lo + len(block)] = block
            offset += size
        if window is None:  # shards without rows of this stream
            window = torch.empty(0, self.dim(site))
        manifest = None
        if with_manifest:
            manifest = {k: [] for k in MANIFEST_FIELDS}
            for shard in shards:
                with safe_open(str(self.shards[shard].path), framework="pt") as f:
                    for k in MANIFEST_FIELDS:
                        manifest[k].append(f.get_tensor(f"{stream}/{k}"))
            manifest = {k: torch.cat(v) for k, v in manifest.items()}
        return window, manifest

    def shuffled_chunks(
        self,
        site: str,
        order: list[int],
        chunk_rows: int,
        generator: torch.Generator,
        *,
        shards_in_memory: int = 8,
        with_manifest: bool = False,
        keep_last: bool = False,
        part: slice | None = None,
        dtype: torch.dtype = torch.float32,
        group: int = 1,
    ) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor] | None]]:
        """One pass over the shards `order` (positions, in this order) as shuffled chunks of
        `chunk_rows` rows: (x [chunk_rows, d] in `dtype`, manifest {field: [chunk_rows]} or None).

        Shards are read `shards_in_memory` at a time into a window whose rows are shuffled with one
        `torch.randperm(window rows, generator=generator)`; the rows a window leaves over start the
        next window's first chunk. `keep_last` also yields the last, incomplete chunk. `part` keeps
        only that slice of each chunk (a rank's share of a global batch) and gathers only those rows.
        `group` > 1 shuffles blocks of that many consecutive rows instead, each kept whole and in
        order (an image's tokens; `chunk_rows`, `part` and every shard's rows are multiples of it):
        the permutation is then `torch.randperm(window rows / group)`.
        Memory: one window in the storage dtype, plus one chunk.
        """
        part = part or slice(None)
        pending_x = pending_m = None  # rows left over by the previous window, already shuffled

        def rows(x, manifest, idx):
            return x[idx], None if manifest is None else {k: v[idx] for k, v in manifest.items()}

        def take(window, manifest, idx):
            x, m = rows(window, manifest, idx)
            return x.to(dtype), m

        def join(a, b):
            if a is None:
                return b
            return torch.cat([a, b]) if torch.is_tensor(a) else {k: torch.cat([a[k], b[k]]) for k in a}

        for start in range(0, len(order), shards_in_memory):
            window, manifest = self._window(site, order[start : start + shards_in_memory], with_manifest)
            perm = torch.randperm(len(window) // group, generator=generator)
            if group > 1:
                perm = (perm[:, None] * group + torch.arange(group)).reshape(-1)
            pos = 0
            if pending_x is not None:
                need = chunk_rows - len(pending_x)
                x, m = take(window, manifest, perm[:need])
                pending_x, pending_m, pos = join(pending_x, x), join(pending_m, m), min(need, len(perm))
                if len(pending_x) < chunk_rows:
                    continue
                yield rows(pending_x, pending_m, part)
                pending_x = pending_m = None
            while pos + chunk_rows <= len(perm):
                yield take(window, manifest, perm[pos : pos + chunk_rows][part])
                pos += chunk_rows
            pending_x, pending_m = take(window, manifest, perm[pos:])
            del window, manifest
        if keep_last and pending_x is not None and len(pending_x):
            yield rows(pending_x, pending_m, part)

    def batches(
        self,
        site: str,
        batch_size: int,
        *,
        shards: list[int] | None = None,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shards_in_memory: int = 8,
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[torch.Tensor]:
        """Shuffled batches [batch_size, d] of one epoch over `shards`, streamed `shards_in_memory`
        shards at a time (rows are shuffled within that window, shards across the epoch).

        With `world_size` > 1 each global batch of `batch_size * world_size` rows is split by rank, so
        data-parallel workers together see exactly what one worker with the global batch would see.
        A last incomplete global batch is dropped.
        """
        return self._epoch_batches(
            site, batch_size, 1, shards=shards, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
            shards_in_memory=shards_in_memory, dtype=dtype,
        )  # fmt: skip

    def tokens_per_image(self, site: str) -> int:
        """Rows of one (prompt, step) pair of the site's stream: an image's tokens (or a caption's)."""
        stream = parse_site(self._check_site(site)).stream
        shard = next((s for s in self.shards if s.rows[stream]), None)
        if shard is None:
            raise ActivationStoreError(f"{self.folder} has no {stream} rows; harvest first.")
        with safe_open(str(shard.path), framework="pt") as f:
            prompt, step = f.get_tensor(f"{stream}/prompt_id"), f.get_tensor(f"{stream}/step")
        same = (prompt == prompt[0]) & (step == step[0])
        return int(same.int().argmin()) if not same.all() else len(same)

    def image_batches(
        self,
        site: str,
        images_per_batch: int,
        *,
        shards: list[int] | None = None,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shards_in_memory: int = 8,
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[torch.Tensor]:
        """Like `batches`, but each batch holds whole images: [images_per_batch x tokens_per_image, d],
        the rows of one (prompt, step) pair together and in token order, the images shuffled within a
        window of `shards_in_memory` shards (shards across the epoch). For losses over an image's
        tokens (`fluxsae.sae_training.scene_consistency`). A rank gets its share of each global batch
        of `images_per_batch * world_size` images; a last incomplete global batch is dropped, so an
        epoch has `steps_per_epoch(site, images_per_batch * tokens_per_image, world_size)` batches."""
        site = self._check_site(site)
        if images_per_batch < 1:
            raise ValueError(f"images_per_batch must be >= 1, got {images_per_batch}.")
        per_image = self.tokens_per_image(site)
        for shard in range(len(self.shards)) if shards is None else shards:
            self._check_whole_images(site, shard, per_image)
        return self._epoch_batches(
            site, images_per_batch * per_image, per_image, shards=shards, seed=seed, epoch=epoch, rank=rank,
            world_size=world_size, shards_in_memory=shards_in_memory, dtype=dtype,
        )  # fmt: skip

    def _epoch_batches(
        self, site: str, batch_rows: int, group: int, *, shards, seed, epoch, rank, world_size,
        shards_in_memory, dtype,
    ) -> Iterator[torch.Tensor]:  # fmt: skip
        """The batches of `batches` (`group` 1) and `image_batches` (`group` = an image's tokens)."""
        site = self._check_site(site)
        pool = list(range(len(self.shards))) if shards is None else list(shards)
        g = torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + epoch)
        order = [pool[i] for i in torch.randperm(len(pool), generator=g).tolist()]
        chunks = self.shuffled_chunks(
            site, order, batch_rows * world_size, g, shards_in_memory=shards_in_memory,
            part=slice(rank * batch_rows, (rank + 1) * batch_rows), dtype=dtype, group=group,
        )  # fmt: skip
        return (x for x, _ in chunks)

    def _check_whole_images(self, site: str, shard: int, per_image: int) -> None:
        """Refuse a shard whose rows do not come in whole (prompt, step) groups in token order, as
        `training.harvest` writes them (reads only its manifest)."""
        stream = parse_site(site).stream
        with safe_open(str(self.shards[shard].path), framework="pt") as f:
            prompt, step, token = (f.get_tensor(f"{stream}/{k}") for k in ("prompt_id", "step", "token"))
        ok = len(token) % per_image == 0
        if ok:
            key = (prompt.long() * 1_000_003 + step.long()).view(-1, per_image)
            token = token.view(-1, per_image)
            ok = bool((key == key[:, :1]).all() and (token == token[:, :1] + torch.arange(per_image)).all())
        if not ok:
            raise ActivationStoreError(
                f"The rows of {self.shards[shard].path.name} in {self.folder} do not come in whole "
                f"images of {per_image} tokens in token order, so batches of whole images cannot be cut "
                "from them. Harvest again with `python -m training.harvest` (it writes rows in prompt, "
                "step, token order)."
            )

    def steps_per_epoch(self, site: str, batch_size: int, world_size: int = 1, shards=None) -> int:
        stream = parse_site(self._check_site(site)).stream
        chosen = [self.shards[i] for i in (range(len(self.shards)) if shards is None else shards)]
        return math.floor(sum(s.rows[stream] for s in chosen) / (batch_size * world_size))

    def write_manifest(self) -> None:
        """manifest.json: the shards found and their rows. Written last, once every shard is there:
        readers refuse a harvest without it (`complete`)."""
        self.shards = self._scan()
        write_json(
            self.folder / MANIFEST_FILE,
            {
                "shards": [
                    {"file": f"shards/{s.path.name}", "prompts": list(s.prompts), "rows": s.rows}
                    for s in self.shards
                ],
                "rows": {
                    stream: sum(s.rows.get(stream, 0) for s in self.shards) for stream in ("image", "text")
                },
            },
        )


def split_shards(n_shards: int, held_out: float) -> tuple[list[int], list[int]]:
    """(train, held-out) shard positions: the last `held_out` share of shards (at least one when
    there are two or more) is held out, so held-out rows come from prompts training never saw."""
    n_eval = 0 if n_shards < 2 or held_out <= 0 else max(1, round(n_shards * held_out))
    return list(range(n_shards - n_eval)), list(range(n_shards - n_eval, n_shards))
