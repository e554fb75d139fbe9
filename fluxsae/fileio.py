"""Atomic writes: a file or folder is either the old one or the complete new one, never half.

Training, harvesting and publishing can be killed (or run out of disk) at any moment; everything they
write goes through these helpers so that a resumed run, a loader or a publish never reads a torn file.

One rule for every artifact made of several files (a dictionary's site folder, a label dataset, an
exported SAE): it is written whole into a temporary folder beside its place and moved into place in
one step (`atomic_path(folder, is_dir=True)`). A harvest, which grows shard by shard, instead writes its
`manifest.json` last, and `fluxsae.activations.ActivationStore` refuses a folder without one.

Files and folders get the mode the process's umask asks for (as `open` would give them), not the
private 0600 / 0700 of `tempfile`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _step(what: str, path: Path) -> None:
    """Called before each step of a write ("write": the temporary file or folder is complete, "sync",
    "rename"). It does nothing: tests replace it to make the n-th step fail as a full disk would."""


def umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux's /proc), so
    other threads never see a zero umask."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    _step("sync", path)
    _sync(path)


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(folder: Path) -> None:
    """fsync every file of `folder` (a full disk may only show here, when the data is flushed)."""
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            _fsync(Path(root) / name)
    _sync(folder)


_RENAME_EXCHANGE = 2
"""renameat2 flag: swap two paths in one step (Linux >= 3.15, glibc >= 2.28)."""


def _exchange(a: Path, b: Path) -> bool:
    """Swap the folders `a` and `b` in one atomic step; False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    done = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if done == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False  # the file system (or a sandbox) cannot exchange: fall back to two renames
    raise OSError(err, f"could not move {a} into place at {b}: {os.strerror(err)}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clear_stale(path: Path) -> None:
    """Remove the temporary copies of `path` that a killed process left beside it (their names carry
    the writer's process id; those of running processes are left alone)."""
    for kind in ("tmp", "old"):
        for stale in path.parent.glob(f".{glob.escape(path.name)}.{kind}-*"):
            pid = stale.name[len(f".{path.name}.{kind}-") :].split("-")[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                _remove(stale)


def _carry(old: Path, new: Path, keep: Callable[[str], bool]) -> None:
    """Hard-link (or copy) into `new` the entries of `old` that `keep` names and `new` lacks."""
    for entry in sorted(old.iterdir()) if old.is_dir() else []:
        if (new / entry.name).exists() or not keep(entry.name):
            continue
        if entry.is_dir():
            shutil.copytree(entry, new / entry.name, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, *, is_dir: bool = False, carry: Callable[[str], bool] | None = None
) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one step.

    A file is written, synced and renamed over the old one. A folder is written whole into a temporary
    folder, synced, and swapped with the old one in one rename (renameat2 RENAME_EXCHANGE); where the
    file system cannot swap, the old folder is moved aside first, so a crash between the two renames
    leaves it as `.<name>.old-<pid>-*` rather than nothing at all. `carry(name)`: entries of the old
    folder to keep in the new one (hard links) when the new one does not write them. On any error
    (a full disk included) `path` is left as it was and the temporary copy is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale(path)
    prefix = f".{path.name}.tmp-{os.getpid()}-"
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        _step("write", tmp)
        # as `open` and `mkdir` would have made them (tempfile makes them private; some writers replace
        # the file they are given by one of their own)
        os.chmod(tmp, (0o777 if is_dir else 0o666) & ~umask())
        if is_dir:
            if carry is not None:
                _carry(path, tmp, carry)
            _sync_tree(tmp)
            _step("rename", path)
            if path.exists() and _exchange(tmp, path):
                pass  # tmp now holds the old folder; removed below
            elif path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-{os.getpid()}-", dir=path.parent))
                os.replace(path, old / path.name)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        else:
            _fsync(tmp)
            _step("rename", path)
            os.replace(tmp, path)
        with contextlib.suppress(OSError):
            _sync(path.parent)  # the rename itself survives a power cut
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_tensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None
) -> None:
    """Save tensors as safetensors, atomically; metadata values are JSON-encoded strings."""
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Inverse of `save_tensors`: (tensors, metadata)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    return load_file(str(path)), meta
