"""Crash-safe checkpoints: temp file, fsync, rename; ``last.pt`` always the newest complete one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(folder: Path, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``epoch_<N>.pt`` and ``last.pt`` atomically; keep the newest ``keep`` epoch files."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"epoch_{state['epoch']:04d}.pt"
    _atomic_save(state, path)
    tmp_last = folder / "last.pt.tmp"
    shutil.copyfile(path, tmp_last)
    with tmp_last.open("rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp_last, folder / "last.pt")
    if keep > 0:
        for old in sorted(folder.glob("epoch_*.pt"))[:-keep]:
            old.unlink()
    return path


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint without running code from it (``weights_only=True``)."""
    return torch.load(path, map_location="cpu", weights_only=True)
