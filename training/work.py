"""A resumable run's work folder: the settings it was started with, its checkpoints and its logs.

Every training command (harvest, train_sae, build_itda, shapes_model) can be killed and run again
with the same command. That is safe only if the folder it resumes from was started with the same
settings, so `claim` records them on the first run and refuses a folder that holds other ones; the
checkpoints are written atomically, so a kill never leaves a torn one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import typing
from collections.abc import Mapping
from pathlib import Path

import torch

from fluxsae.fileio import load_tensors, save_tensors, write_json
from training.cli import unwrap_optional

logger = logging.getLogger("training.work")

RUN_FILES = {
    "train_config.json": "an SAE training run (python -m training.train_sae)",
    "build_config.json": "an ITDA build (python -m training.build_itda)",
    "harvest.json": "a harvest (python -m training.harvest)",
}
"""The settings file each kind of run claims its folder with: a folder holds one kind of run only (an SAE
training and an ITDA build both keep a checkpoint.safetensors and a result.json)."""


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
    check_run_folder(folder, filename, flag)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    current = _as_json(settings)
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except (ValueError, OSError) as e:
            raise SystemExit(
                f"{path} is unreadable ({e}), so {folder} cannot be resumed; pass another {flag} or "
                "delete it."
            ) from e
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


def check_run_folder(folder: Path, filename: str, flag: str = "--work") -> None:
    """SystemExit if `folder` is a file, or the folder of another kind of run (`RUN_FILES`) than the one
    that claims it with `filename`: resuming from, or deleting, the other's checkpoint would be wrong."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SystemExit(f"{flag} {folder} is a file; pass a folder.")
    for other, what in RUN_FILES.items():
        if other != filename and (folder / other).is_file():
            mine = RUN_FILES.get(filename, "this run")
            raise SystemExit(
                f"{flag} {folder} is the folder of {what} (it holds {other}); this is {mine}. Pass another "
                f"{flag}: its checkpoint and results are not this run's."
            )


def check_out(folder: Path | None, key: str, settings, *, overwrite: bool = False, what: str = "dictionary",
              flag: str = "--out") -> None:  # fmt: skip
    """SystemExit unless `folder` (a dictionary's site folder) may receive this run's result: it does not
    exist, is empty, or holds the result of this very run (its cfg.json's extra[key] equals `settings`,
    so a rerun writes it again) or `overwrite` is set. Checked before any work."""
    if folder is None or overwrite or not folder.exists():
        return
    if not folder.is_dir():
        raise SystemExit(f"{flag}: {folder} is a file; pass a folder.")
    if not any(folder.iterdir()):
        return
    current = _as_json(settings)
    try:
        saved = json.loads((folder / "cfg.json").read_text())
        recorded = saved.get("extra", {}).get(key)
    except (OSError, ValueError, AttributeError):
        saved, recorded = None, None
    if recorded is not None and _as_json(recorded) == current:
        return
    if saved is None:
        held = "files that are not a readable dictionary"
    else:
        shape = ", ".join(f"{k} {saved[k]}" for k in ("n_features", "k") if k in saved)
        held = f"another {saved.get('architecture', 'dictionary')!r} dictionary ({shape})"
        if isinstance(recorded, dict):
            changed = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
            held += f", made with other settings ({', '.join(changed)} differ)"
    raise SystemExit(
        f"{folder} already holds {held}; this {what} would replace it. Pass --overwrite to replace it, or "
        f"another {flag}."
    )


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
    """Append one JSON line to a log, whole or not at all. Opened per row, so a killed run leaves no open
    handle; a torn last line (a kill or a full disk in the middle of an earlier append) is cut off first,
    and a write that fails part-way is undone, so the log stays a list of whole rows."""
    line = (json.dumps(row) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        size = os.fstat(fd).st_size
        whole = _whole_lines(fd, size)
        if whole < size:
            logger.warning("%s: cutting off its torn last line (%d bytes) to append", path, size - whole)
            os.ftruncate(fd, whole)
        try:
            done = 0
            while done < len(line):
                done += os.write(fd, line[done:])
        except OSError as e:
            os.ftruncate(fd, whole)  # no half row left behind
            raise OSError(e.errno, f"could not append a row to {path}: {e.strerror}") from e
    finally:
        os.close(fd)


def _whole_lines(fd: int, size: int) -> int:
    """The length of the file's part that ends with its last newline (0 if none)."""
    end, block = size, 1 << 16
    while end > 0:
        start = max(0, end - block)
        chunk = os.pread(fd, end - start, start)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        end = start
    return 0


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a log `append_jsonl` wrote. A torn last line (no newline after it: the run was killed
    or the disk filled while writing it) is skipped with a warning; any other line that is not JSON is an
    error naming the file and the line."""
    path = Path(path)
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as e:
        raise OSError(e.errno, f"could not read {path}: {e.strerror}") from e
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            if number == len(lines):  # after the last newline: a row cut short
                logger.warning("%s: skipping its torn last line %d (%s)", path, number, e)
                continue
            raise ValueError(
                f"{path}, line {number}: not a JSON row ({e}); delete that line (or the file) and run again"
            ) from e
    return rows
