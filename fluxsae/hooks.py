"""Step-aware, exception-safe hooks on Flux sites: `capture` records, `edit_site` changes.

Every hook lives only inside its `with` block and is removed in `finally`, so an exception raised
in the middle of a generation leaves the pipeline exactly as it was: a hook left behind would
silently corrupt every later image.

Which denoising step is running is read from the pipeline's scheduler: FluxPipeline calls
`scheduler.set_timesteps` (a new `timesteps` tensor) once per generation and `scheduler.step`
once per step, so `scheduler.step_index` is the step (None on step 0). With `true_cfg_scale > 1`
the transformer runs twice per step, first on the prompt ("cond"), then on the negative prompt
("uncond"); the pass is told apart by counting calls within a step.

Recording a CUDA site into CPU memory (`capture`'s default) must not stall the GPU: at FLUX.1's
1024 px a site is [batch, 4096, 3072] per step, and a plain `.to("cpu")` makes the host wait for every
queued kernel, copy while the GPU idles, then queue the next block's kernels late. So each recorded
tensor is cast on the GPU (when a storage dtype is asked for) and copied into pinned (page-locked) CPU
memory with `non_blocking=True`, queued on the stream behind the block that made it; the host
synchronises once, with the event of the last copy, when the `with` block ends or a result is first
read (the step's noise level too is kept as a device scalar until then). Same bytes, same dtype
conversion (round to nearest even, as on the CPU), so the values are bit-identical. Pinned memory
rather than buffering on the GPU, because it takes no GPU memory (a 1024 px, 4-step, batch-16
capture of two sites is 3 GiB) and the copies overlap the next steps. On CPU nothing changes: one
synchronous copy per step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from fluxsae.sites import Site, resolve_site

CfgPass = Literal["cond", "uncond", "both"]
_PASS_NAMES = ("cond", "uncond")


@dataclass
class StepTracker:
    """Knows, while the transformer runs, which generation, step and CFG pass it is in."""

    scheduler: object
    generation: int = -1
    step: int = 0
    pass_index: int = 0
    _timesteps: object = None
    _sigma: object = None  # the timestep the transformer got: a 0-d tensor (read lazily: no sync) or None

    def before_transformer(self, module, args, kwargs) -> None:
        timesteps = getattr(self.scheduler, "timesteps", None)
        step = getattr(self.scheduler, "step_index", None)
        if step is None:  # the first call: an img2img run starts at the schedule's begin_index, not at 0
            step = getattr(self.scheduler, "begin_index", None) or 0
        if timesteps is not self._timesteps or self.generation < 0:
            # We keep a reference to the tensor, so its id cannot be reused by a later one.
            self._timesteps = timesteps
            self.generation += 1
            self.pass_index = 0
        elif step == self.step:
            self.pass_index += 1
        else:
            self.pass_index = 0
        self.step = step
        t = kwargs.get("timestep", args[3] if len(args) > 3 else None)
        self._sigma = t.detach().flatten()[0] if isinstance(t, torch.Tensor) else None

    @property
    def sigma(self) -> float:
        """The noise level of the running step (reading it waits for the GPU)."""
        return _as_float(self._sigma)

    @property
    def pass_name(self) -> str:
        return _PASS_NAMES[min(self.pass_index, 1)]


def _as_float(t) -> float:
    return float(t) if t is not None else float("nan")


def _check_pass(cfg_pass: str) -> None:
    if cfg_pass not in ("cond", "uncond", "both"):
        raise ValueError(f"cfg_pass must be 'cond', 'uncond' or 'both', got {cfg_pass!r}.")


def _step_set(steps: Iterable[int] | None) -> frozenset[int] | None:
    if steps is None:
        return None
    if isinstance(steps, int):
        steps = [steps]
    out = frozenset(int(s) for s in steps)
    if any(s < 0 for s in out):
        raise ValueError(f"Denoising steps are counted from 0; got negative steps {sorted(out)}.")
    return out


@contextlib.contextmanager
def track_steps(pipe) -> Iterator[StepTracker]:
    """While inside, the yielded tracker knows the generation, denoising step, sigma and CFG pass the
    transformer is running (its pre-hook is removed on exit, also after an exception)."""
    tracker = StepTracker(scheduler=getattr(pipe, "scheduler", None))
    handle = pipe.transformer.register_forward_pre_hook(tracker.before_transformer, with_kwargs=True)
    try:
        yield tracker
    finally:
        handle.remove()


@dataclass
class Captured(Mapping):
    """What `capture` recorded: `acts[site]` is a tensor [steps, batch, tokens, d].

    Several generations inside one `capture` block are concatenated along the batch axis (they
    must have recorded the same steps). `steps` are the denoising step indices recorded, in order,
    and `sigmas` the noise level of each (the `timestep` the transformer received, in [0, 1];
    the scheduler's timestep is 1000x that). `cfg_pass` says which transformer pass was kept.
    """

    sites: tuple[Site, ...]
    cfg_pass: str
    _data: dict = field(default_factory=dict)  # (site, generation) -> {step: tensor [batch, tokens, d]}
    _sigmas: dict = field(default_factory=dict)  # (generation, step) -> sigma (a 0-d tensor or None)
    _pending: list = field(default_factory=list)  # CUDA events of copies not yet known to be done

    def _wait(self) -> None:
        """Block until every queued device-to-host copy has landed (events complete in stream order,
        so waiting on the last one of each stream is enough)."""
        if self._pending:
            last = {}
            for event, stream in self._pending:
                last[stream] = event
            for event in last.values():
                event.synchronize()
            self._pending.clear()

    def _generations(self, site: Site) -> list[dict[int, torch.Tensor]]:
        return [v for (s, _), v in sorted(self._data.items(), key=lambda kv: kv[0][1]) if s == site]

    @property
    def steps(self) -> list[int]:
        gens = self._generations(self.sites[0]) if self.sites else []
        return sorted(gens[0]) if gens else []

    @property
    def sigmas(self) -> torch.Tensor:
        gens = sorted({g for g, _ in self._sigmas})
        if not gens:
            return torch.empty(0)
        return torch.tensor([_as_float(self._sigmas[(gens[0], s)]) for s in self.steps])

    @property
    def n_generations(self) -> int:
        return len({g for _, g in self._data})

    def __getitem__(self, site: str | Site) -> torch.Tensor:
        key = site if isinstance(site, Site) else next((s for s in self.sites if str(s) == site), None)
        if key not in self.sites:
            raise KeyError(f"Site {site!r} was not captured; captured sites: {[str(s) for s in self.sites]}.")
        self._wait()
        gens = self._generations(key)
        if not gens:
            raise KeyError(
                f"Nothing was recorded at {site!r}: no generation ran inside the capture block, or none "
                f"of its steps matched the requested steps."
            )
        steps = sorted(gens[0])
        if any(sorted(g) != steps for g in gens):
            raise ValueError(
                "The generations inside this capture block recorded different steps "
                f"({[sorted(g) for g in gens]}); use one capture block per generation."
            )
        return torch.cat([torch.stack([g[s] for s in steps]) for g in gens], dim=1)

    def __iter__(self):
        return (str(s) for s in self.sites)

    def __len__(self) -> int:
        return len(self.sites)


@contextlib.contextmanager
def capture(
    pipe,
    sites: str | Site | Sequence[str | Site],
    steps: Iterable[int] | None = None,
    *,
    cfg_pass: Literal["cond", "uncond"] = "cond",
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | None = None,
) -> Iterator[Captured]:
    """Record the residual stream at `sites` while `pipe(...)` runs inside the block.

    `steps`: denoising step indices to keep (None: all). `cfg_pass`: with `true_cfg_scale > 1`
    the transformer runs on the prompt ("cond") and on the negative prompt ("uncond"); one is kept.
    `device`/`dtype`: where and how to store (None keeps the activation's own).

        with capture(pipe, ["transformer_blocks.18.image"]) as acts:
            pipe(prompt, ...)
        acts["transformer_blocks.18.image"]  # [steps, batch, tokens, d]
    """
    if cfg_pass not in ("cond", "uncond"):
        raise ValueError(f"capture keeps one pass: cfg_pass must be 'cond' or 'uncond', got {cfg_pass!r}.")
    if isinstance(sites, (str, Site)):
        sites = [sites]
    resolved = [resolve_site(pipe, s) for s in sites]
    if not resolved:
        raise ValueError("capture needs at least one site, e.g. 'transformer_blocks.0.image'.")
    keep = _step_set(steps)
    result = Captured(sites=tuple(s for s, _ in resolved), cfg_pass=cfg_pass)
    handles = []
    with track_steps(pipe) as tracker:
        try:
            for site, block in resolved:

                def record(module, args, kwargs, output, site=site):
                    if tracker.pass_name != cfg_pass or (keep is not None and tracker.step not in keep):
                        return None
                    h = _store(output[site.output_position].detach(), device, dtype, result._pending)
                    result._data.setdefault((site, tracker.generation), {})[tracker.step] = h
                    result._sigmas[(tracker.generation, tracker.step)] = tracker._sigma
                    return None

                handles.append(block.register_forward_hook(record, with_kwargs=True))
            yield result
        finally:
            for h in handles:
                h.remove()
            result._wait()


def _store(h: torch.Tensor, device, dtype, pending: list) -> torch.Tensor:
    """A copy of `h` on `device` in `dtype` (None: keep `h`'s). From CUDA to the CPU the copy goes into
    pinned memory without blocking, and its event is appended to `pending` (see the module docstring)."""
    target = torch.device(device) if device is not None else h.device
    dtype = dtype or h.dtype
    if h.device.type != "cuda" or target.type != "cpu":
        # clone: a single block's image stream is a view into the joint sequence.
        return h.to(device=target, dtype=dtype, copy=True)
    # No clone on the GPU: the copy is queued on the stream before any later kernel, so it reads h
    # before anything can overwrite it, and the caching allocator reuses freed memory in stream order.
    src = h if h.dtype == dtype else h.to(dtype)
    out = torch.empty(src.shape, dtype=dtype, device="cpu", pin_memory=True)
    out.copy_(src, non_blocking=True)
    stream = torch.cuda.current_stream(src.device)
    event = torch.cuda.Event()
    event.record(stream)
    pending.append((event, stream))
    return out


EditFn = Callable[[torch.Tensor, int], torch.Tensor]


@contextlib.contextmanager
def edit_site(
    pipe,
    site: str | Site,
    fn: EditFn,
    steps: Iterable[int] | None = None,
    *,
    cfg_pass: CfgPass = "both",
) -> Iterator[None]:
    """Replace the residual stream at `site` by `fn(hidden [batch, tokens, d], step)` while inside.

    The edit applies on `steps` (None: all) and on the chosen CFG pass(es). What `fn` returns
    flows into every later block, exactly as if the block had produced it.
    """
    _check_pass(cfg_pass)
    site, block = resolve_site(pipe, site)
    keep = _step_set(steps)
    with track_steps(pipe) as tracker:

        def hook(module, args, kwargs, output):
            if keep is not None and tracker.step not in keep:
                return None
            if cfg_pass != "both" and tracker.pass_name != cfg_pass:
                return None
            h = output[site.output_position]
            new = fn(h, tracker.step)
            if new is h:
                return None
            if new.shape != h.shape:
                raise ValueError(
                    f"An edit of {site} must keep the shape {tuple(h.shape)}, got {tuple(new.shape)}."
                )
            out = list(output)
            out[site.output_position] = new.to(h.dtype)
            return tuple(out)

        handle = block.register_forward_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()


def token_index(tokens: torch.Tensor | Sequence[int] | None, n_tokens: int) -> torch.Tensor | None:
    """Normalise a token selection (bool mask [n_tokens] or indices) to a long index tensor."""
    if tokens is None:
        return None
    t = torch.as_tensor(tokens)
    if t.dtype == torch.bool:
        if t.numel() != n_tokens:
            raise ValueError(f"A token mask must have {n_tokens} entries (one per token), got {t.numel()}.")
        return t.flatten().nonzero().flatten()
    t = t.flatten().long()
    if t.numel() and (t.min() < 0 or t.max() >= n_tokens):
        raise ValueError(
            f"Token indices must lie in 0-{n_tokens - 1}, got {t.min().item()}-{t.max().item()}."
        )
    return t


@contextlib.contextmanager
def add_to_site(
    pipe,
    site: str | Site,
    vector: torch.Tensor,
    strength: float = 1.0,
    steps: Iterable[int] | None = None,
    tokens: torch.Tensor | Sequence[int] | None = None,
    *,
    cfg_pass: CfgPass = "both",
) -> Iterator[None]:
    """Add `strength * vector` to the chosen tokens of `site` on the chosen steps.

    `vector`: [d], or [tokens, d] for a per-token addition. `tokens`: a bool mask over the
    site's tokens or their indices (None: every token). Strength 0 changes nothing, bit for bit.
    """
    vector = torch.as_tensor(vector).detach()
    if not torch.isfinite(vector).all():
        raise ValueError(f"The vector added to {site} has NaN or infinite entries.")
    strength = float(strength)
    cache: dict = {}

    def add(h: torch.Tensor, step: int) -> torch.Tensor:
        if strength == 0.0:
            return h
        if h.shape[-1] != vector.shape[-1]:
            raise ValueError(f"Site {site} has width {h.shape[-1]}, the vector has {vector.shape[-1]}.")
        key = (h.device, h.dtype)
        if key not in cache:
            cache[key] = (strength * vector.to(device=h.device, dtype=torch.float32)).to(h.dtype)
            cache["idx"] = token_index(tokens, h.shape[1])
            if cache["idx"] is not None:
                cache["idx"] = cache["idx"].to(h.device)
        delta, idx = cache[key], cache["idx"]
        if idx is None:
            return h + delta
        out = h.clone()
        out[:, idx] += delta if delta.ndim == 1 else delta[idx]
        return out

    with edit_site(pipe, site, add, steps, cfg_pass=cfg_pass):
        yield
