"""Crash-safe checkpoints: temp file, fsync, rename; ``last.pt`` always the newest complete one.

``last.pt`` is a hard link to the newest numbered file (written once, not twice), swapped in by an
atomic rename; where the file system refuses hard links it is a copy, swapped in the same way. A
save that fails part-way (disk full, I/O error) removes its partial files and raises
:class:`CheckpointError`; ``last.pt`` then still names the previous complete checkpoint.

Checkpoints are loaded with ``torch.load(weights_only=True)``: they hold tensors and plain
Python values only, so a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import errno
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from distlocal.errors import ConfigError

FORMAT = "distlocal-checkpoint-v1"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; ``last.pt`` still names the previous complete one."""


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write leaves no partial file behind


# Errors of os.link that mean "this file system has no hard links here", not "the disk is broken".
_NO_LINKS = {errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS,
             errno.EACCES}


def link_or_copy(src: Path, dst: Path) -> str:
    """Make ``dst`` name the same bytes as ``src`` atomically: a hard link, else a copy; returns which.

    The new name is made beside ``dst`` and renamed over it, so ``dst`` is at every moment either
    its old file or the complete new one.
    """
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
            how = "link"
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
            shutil.copyfile(src, tmp)
            with tmp.open("rb+") as f:
                os.fsync(f.fileno())
            how = "copy"
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return how


def _numbered(folder: Path) -> list[Path]:
    """Numbered checkpoints, oldest first."""
    files = [*folder.glob("epoch_*.pt"), *folder.glob("step_*.pt")]
    return sorted(files, key=lambda p: p.stat().st_mtime_ns)


def save(folder: Path, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``<name>.pt`` then point ``last.pt`` at it; keep the newest ``keep`` numbered files.

    The file is named by epoch (``epoch_0003.pt``) or, mid-epoch, by global step
    (``step_00001234.pt``). ``last.pt`` is swapped to it only after it is complete and on disk, so
    a crash at any point leaves a complete ``last.pt`` or the previous one. A failed write raises
    :class:`CheckpointError` (one line: what failed and what to do) after removing its partial
    files; the previous checkpoints are untouched.
    """
    state = {"format": FORMAT, **state}
    name = (
        f"step_{state['global_step']:08d}.pt" if state.get("mid_epoch") else f"epoch_{state['epoch']:04d}.pt"
    )
    path = folder / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_save(state, path)
        link_or_copy(path, folder / "last.pt")
        _fsync_dir(folder)
    except Exception as exc:  # ENOSPC, EIO, a pickling error: the run decides (retry or stop)
        prev = folder / "last.pt"
        kept = "last.pt still holds the previous checkpoint" if prev.exists() else "no earlier checkpoint"
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise CheckpointError(f"could not write checkpoint {path} ({reason}); {kept}; free space or fix "
                              f"the file system under {folder}, then rerun with resume=auto") from exc
    if keep > 0:
        for old in _numbered(folder)[:-keep]:
            old.unlink()
    return path


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint safely; a file that is not one raises ``ValueError`` saying why."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle refused by weights_only, not a torch file, ...
        raise ValueError(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError("not a distlocal checkpoint (no 'format' key)")
    return state


def find_resume(resume: str | None, run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from, or ``None`` for a fresh start.

    ``resume=auto`` takes the newest readable checkpoint under ``<run dir>/checkpoints``
    (``last.pt`` first, then the numbered files newest first); a truncated or corrupt one is
    skipped with a warning. No checkpoint at all starts fresh (the first attempt of an elastic
    job); checkpoints that are all unreadable are an error. ``resume=<path>`` must be readable.
    Without ``resume`` a run directory that already holds a run is an error: it is never
    overwritten unless asked to resume.
    """
    folder = run_dir / "checkpoints"
    if resume is None:
        if (run_dir / "metrics.jsonl").exists() or any(folder.glob("*.pt")):
            raise ConfigError(
                f"run directory '{run_dir}' already holds a run; pass resume=auto to continue it "
                "or choose another hydra.run.dir"
            )
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.is_file():
            raise ConfigError(f"resume={resume}: no such file; pass resume=auto or a checkpoint path")
        try:
            return path, load(path)
        except ValueError as exc:
            raise ConfigError(f"resume={resume} is not a readable distlocal checkpoint ({exc})") from None
    last = [folder / "last.pt"] if (folder / "last.pt").exists() else []
    candidates = last + _numbered(folder)[::-1]
    for path in candidates:
        try:
            return path, load(path)
        except ValueError as exc:
            warnings.warn(f"distlocal: skipping unreadable checkpoint {path} ({exc})", stacklevel=2)
    if candidates:
        raise ConfigError(
            f"no readable checkpoint under '{folder}' ({len(candidates)} unreadable); "
            "pass resume=<path> to a good one or start a new run directory"
        )
    return None
