"""checkpoint.py in-process: last.pt by hard link (copy fallback), atomic swaps, a write failing part-way."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from test_resume import BASE, _assert_same_run, _rows

from distlocal import checkpoint
from distlocal.config import compose
from distlocal.trainer import train


def _state(epoch: int, **extra) -> dict:
    return {"epoch": epoch, "global_step": 10 * (epoch + 1), "mid_epoch": False,
            "model": {"w": torch.full((4,), float(epoch))}, **extra}


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_last_is_a_hard_link_to_the_newest(tmp_path):
    folder = tmp_path / "ckpt"
    for e in range(3):
        path = checkpoint.save(folder, _state(e), keep=2)
        assert os.path.samefile(folder / "last.pt", path)  # the same inode: written once
        assert path.stat().st_nlink == 2
    assert _names(folder) == ["epoch_0001.pt", "epoch_0002.pt", "last.pt"]  # no .tmp left
    assert checkpoint.load(folder / "last.pt")["epoch"] == 2
    assert checkpoint.load(folder / "epoch_0001.pt")["epoch"] == 1  # moving last.pt left it intact


def test_keep_zero_keeps_every_numbered_file(tmp_path):
    folder = tmp_path / "ckpt"
    for e in range(3):
        checkpoint.save(folder, _state(e), keep=0)
    assert _names(folder) == ["epoch_0000.pt", "epoch_0001.pt", "epoch_0002.pt", "last.pt"]


@pytest.mark.parametrize("code", [errno.EPERM, errno.EXDEV, errno.ENOTSUP])
def test_copy_fallback_where_links_fail(tmp_path, monkeypatch, code):
    folder = tmp_path / "ckpt"
    checkpoint.save(folder, _state(0))

    def no_links(src, dst):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(checkpoint.os, "link", no_links)
    path = checkpoint.save(folder, _state(1))
    assert not os.path.samefile(folder / "last.pt", path)  # a copy ...
    assert (folder / "last.pt").read_bytes() == path.read_bytes()  # ... of the same bytes
    assert checkpoint.load(folder / "last.pt")["epoch"] == 1
    assert "last.pt.tmp" not in _names(folder)


def test_link_or_copy_reports_which(tmp_path, monkeypatch):
    src = tmp_path / "a"
    src.write_bytes(b"x" * 100)
    assert checkpoint.link_or_copy(src, tmp_path / "b") == "link"
    monkeypatch.setattr(checkpoint.os, "link", lambda s, d: (_ for _ in ()).throw(OSError(errno.EXDEV, "")))
    assert checkpoint.link_or_copy(src, tmp_path / "b") == "copy"
    assert (tmp_path / "b").read_bytes() == src.read_bytes() and not os.path.samefile(src, tmp_path / "b")


def _fail_torch_save_midway(monkeypatch, code: int = errno.ENOSPC) -> list[int]:
    """torch.save writes part of the file, then the disk is full."""
    calls: list[int] = []

    def partial_save(obj, f):
        calls.append(1)
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(checkpoint.torch, "save", partial_save)
    return calls


def test_write_failing_part_way_leaves_the_previous_last(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    checkpoint.save(folder, _state(0))
    before = (folder / "last.pt").read_bytes()
    calls = _fail_torch_save_midway(monkeypatch)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.save(folder, _state(1))
    assert calls
    msg = str(info.value)
    assert "\n" not in msg
    assert "No space left on device" in msg and "last.pt still holds the previous checkpoint" in msg
    assert "resume=auto" in msg
    assert _names(folder) == ["epoch_0000.pt", "last.pt"]  # no partial epoch_0001.pt(.tmp)
    assert (folder / "last.pt").read_bytes() == before
    path, state = checkpoint.find_resume("auto", tmp_path)
    assert path.name == "last.pt" and state["epoch"] == 0


def test_link_step_failing_keeps_the_previous_last(tmp_path, monkeypatch):
    """An I/O error while swapping last.pt (not a 'no hard links here' error) is a failed save too."""
    folder = tmp_path / "ckpt"
    checkpoint.save(folder, _state(0))
    monkeypatch.setattr(checkpoint.os, "link", lambda s, d: (_ for _ in ()).throw(OSError(errno.EIO, "I/O")))
    with pytest.raises(checkpoint.CheckpointError, match="last.pt still holds the previous checkpoint"):
        checkpoint.save(folder, _state(1))
    assert checkpoint.load(folder / "last.pt")["epoch"] == 0
    assert "last.pt.tmp" not in _names(folder)


# ---- the trainer: a failed save stops the run with one line; resume=auto loses nothing ----
RUN = [*BASE, "trainer.epochs=2", "profiler.enabled=false"]  # boundary 0, then 1


def test_failed_save_stops_the_run_and_resume_loses_nothing(tmp_path, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(compose(RUN), full / "run")
    real_save = checkpoint.save

    def save_failing_at_epoch_1(folder, state, keep=2):
        if state["epoch"] == 1:
            _fail_torch_save_midway(monkeypatch)  # this save's torch.save: half a file, then ENOSPC
        return real_save(folder, state, keep)

    monkeypatch.setattr(checkpoint, "save", save_failing_at_epoch_1)
    with pytest.raises(checkpoint.CheckpointError, match="No space left on device"):
        train(compose(RUN), cut / "run")
    monkeypatch.undo()
    ckpts = cut / "run" / "checkpoints"
    assert checkpoint.load(ckpts / "last.pt")["epoch"] == 0
    assert not list(ckpts.glob("*.tmp"))
    assert [r["epoch"] for r in _rows(cut)] == [0]  # the checkpoint comes before the row
    train(compose(RUN), cut / "run")  # resume=auto is in BASE
    _assert_same_run(full, cut)
