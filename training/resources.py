"""Will a run fit? Memory and disk estimates, checked before any work, and a refusal when it cannot.

A command that would only fail after hours (out of memory at its first step, out of disk at its last
shard) is refused at once with the estimate and what to change; one that fits but leaves little room
says so.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from training.flux_plan import existing_parent, human_bytes

logger = logging.getLogger("training.resources")

__all__ = ["check_disk", "check_memory", "human_bytes", "memory_of"]


def memory_of(device: str | torch.device) -> tuple[int, int | None]:
    """(total, available or None) bytes of memory where `device` keeps its tensors: the GPU's, or this
    machine's RAM."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(device)
        return total, free
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    return total, available


def check_memory(need: int, device: str | torch.device, what: str, fix: str) -> None:
    """SystemExit when `need` bytes exceed the memory of `device` (its total: the run could never fit);
    a warning when they exceed what is free now."""
    total, available = memory_of(device)
    where = "GPU" if torch.device(device).type == "cuda" else "RAM"
    if need > total:
        raise SystemExit(
            f"{what} needs about {human_bytes(need)} of memory; this machine has {human_bytes(total)} of "
            f"{where}, so it would fail. {fix}"
        )
    if available is not None and need > available:
        logger.warning(
            "%s needs about %s of memory and %s of %s is free now: it may be slow or fail. %s",
            what, human_bytes(need), human_bytes(available), where, fix,
        )  # fmt: skip


def check_disk(need: int, folder: str | os.PathLike, what: str, fix: str) -> None:
    """SystemExit when `need` bytes exceed the free space of the disk that holds (or will hold) `folder`."""
    where = existing_parent(Path(folder))
    free = shutil.disk_usage(where).free
    if need > free:
        raise SystemExit(
            f"{what} needs about {human_bytes(need)} of disk in {folder}, and {where} has "
            f"{human_bytes(free)} free, so it would fail part-way. {fix}"
        )
