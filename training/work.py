"""A resumable run's work folder: the settings it was started with, its checkpoints and its logs.

Every training command (harvest, train_sae, build_itda, shapes_model) can be killed and run again
with the same command. That is safe only if the folder it resumes from was started with the same
settings, so `claim` records them on the first run and refuses a folder that holds other ones; the
checkpoints are written atomically, so a kill never leaves a torn one.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping
from pathlib import Path

import torch

from fluxsae.fileio import load_tensors, save_tensors, write_json
from training.cli import unwrap_optional


def _as_json(obj) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj))


def _upgrade(saved: dict, cls) -> dict:
    """Settings saved by an older version read as today's `cls` would write them: fields it did not
    have take their defaults, and 0 in an optional field (the old spelling of "off" / "automatic",
    e.g. BuildConfig.max_atoms = 0, TrainConfig.lr = 0.0) reads as None."""
    hints = typing.get_type_hints(cls)
    out = dict(saved)
    for f in dataclasses.fields(cls):
        if f.name not in out and f.default is not dataclasses.MISSING:
            out[f.name] = _as_json({"v": f.default})["v"]
        optional = unwrap_optional(hints[f.name])[1]
        if optional and not isinstance(out.get(f.name), bool) and out.get(f.name) == 0:
            out[f.name] = None
    return out


def claim(folder: Path, filename: str, settings, *, what: str = "a run", flag: str = "--work",
          write: bool = True) -> None:  # fmt: skip
    """Record `settings` (a dataclass or a JSON-able dict) as `folder/filename`, or refuse the folder
    with SystemExit if it already holds other settings: resuming would mix two runs.

    `what` names the run in the message ("a build"), `flag` the option that picks another folder.
    `write`: False on processes that must not write (ranks other than 0).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    current = _as_json(settings)
    if path.exists():
        saved = json.loads(path.read_text())
        if dataclasses.is_dataclass(settings):
            saved = _upgrade(saved, type(settings))
        changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if changed:
            raise SystemExit(
                f"{folder} holds {what} with other settings ({', '.join(changed)} differ from {path}); "
                f"pass another {flag} or delete it."
            )
    if write:
        write_json(path, current)


def save_checkpoint(
    path: Path, modules: Mapping[str, torch.nn.Module], optimizer: torch.optim.Optimizer | None, **meta
) -> None:
    """Save modules (tensors `<name>/<key>`), the optimiser state (`optim/<param id>/<key>`, its
    param groups in the metadata) and `meta` (JSON values) to one safetensors file, atomically."""
    tensors, storages = {}, set()
    for name, module in modules.items():
        for k, v in module.state_dict().items():
            # safetensors refuses tensors that share memory (T5 ties its embeddings): copy repeats only
            ptr = v.untyped_storage().data_ptr()
            tensors[f"{name}/{k}"] = v.clone() if ptr in storages else v
            storages.add(ptr)
    if optimizer is not None:
        state = optimizer.state_dict()
        for pid, values in state["state"].items():
            for k, v in values.items():
                tensors[f"optim/{pid}/{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        meta["param_groups"] = state["param_groups"]
    save_tensors(path, tensors, meta)


def load_checkpoint(
    path: Path, modules: Mapping[str, torch.nn.Module], optimizer: torch.optim.Optimizer | None
) -> dict:
    """Inverse of `save_checkpoint`: fills `modules` and `optimizer` in place; returns the metadata."""
    tensors, meta = load_tensors(path)
    for name, module in modules.items():
        prefix = f"{name}/"
        module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    if optimizer is not None:
        state: dict = {}
        for k, v in tensors.items():
            if k.startswith("optim/"):
                _, pid, name = k.split("/", 2)
                state.setdefault(int(pid), {})[name] = v
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta


def append_jsonl(path: Path, row: dict) -> None:
    """Append one JSON line to a log; opened per row, so a killed run leaves no open handle and every
    written row is complete."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
