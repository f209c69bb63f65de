"""Corrupt or unreadable samples (``data.on_corrupt``): one line on every rank, or a counted skip."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import WORKER, check_ok, run, torchrun
from PIL import Image
from test_resume import _assert_same_run, _cut_mid_epoch_2

from distlocal.config import DataConfig, compose
from distlocal.data import Checked, CorruptSample, build_datasets, build_loaders, count_skipped
from distlocal.trainer import train

ONE_PROCESS = SimpleNamespace(distributed=False, rank=0, world_size=1)


def make_folder(root: Path, n_train: int = 40, n_val: int = 8) -> Path:
    """An ImageFolder of small random PNGs: ``train/{a,b}/<i>.png`` and ``val/{a,b}/<i>.png``."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            d = root / split / "ab"[i % 2]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(d / f"{i:02d}.png")
    return root


def spoil(path: Path, how: str) -> None:
    """Make ``path`` unreadable: not an image, a truncated PNG, or gone."""
    if how == "not_an_image":
        path.write_bytes(b"this is not an image")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:80])  # the header survives: PIL fails only when decoding
    else:
        path.unlink()


def _cfg(root: Path, policy: str) -> DataConfig:
    return DataConfig(name="imagefolder", root=str(root), image_size=8, augment=False, on_corrupt=policy)


def _index_of(dataset, name: str) -> int:
    return next(i for i, (p, _) in enumerate(dataset.dataset.samples) if p.endswith(name))


@pytest.mark.parametrize("how", ["not_an_image", "truncated", "missing_after_build"])
def test_error_names_the_file_and_its_index(tmp_path, how):
    root = make_folder(tmp_path / "img")
    if how != "missing_after_build":
        spoil(root / "train" / "a" / "04.png", how)
    bundle = build_datasets(_cfg(root, "error"))
    if how == "missing_after_build":  # the index was built while the file was there
        spoil(root / "train" / "a" / "04.png", how)
    i = _index_of(bundle.train, "04.png")
    bundle.train[i + 1]  # a readable neighbour reads
    with pytest.raises(CorruptSample, match=rf"cannot read sample '.*train/a/04.png' \(index {i}, \w+"):
        bundle.train[i]


@pytest.mark.parametrize("how", ["not_an_image", "truncated", "missing_after_build"])
def test_skip_substitutes_the_next_readable_sample_and_warns_once(tmp_path, capfd, how):
    root = make_folder(tmp_path / "img")
    bundle = build_datasets(_cfg(root, "skip"))
    spoil(root / "train" / "a" / "04.png", how)
    spoil(root / "train" / "a" / "06.png", how)  # the next index is bad too: the one after stands in
    i = _index_of(bundle.train, "04.png")
    assert _index_of(bundle.train, "06.png") == i + 1
    x, y = bundle.train[i]
    x_sub, y_sub = bundle.train[i + 2]
    assert torch.equal(x, x_sub) and y == y_sub
    bundle.train[i]
    warned = [ln for ln in capfd.readouterr().err.splitlines() if "04.png" in ln]
    assert len(warned) == 1 and "data.on_corrupt=skip" in warned[0]
    assert bundle.train.bad.nonzero().flatten().tolist() == [i, i + 1]


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_workers_error_is_one_line_and_skips_are_counted(tmp_path, workers):
    """Through DataLoader workers (separate processes): the error keeps its one line, and the skip
    flags a worker sets reach the main process that counts them."""
    root = make_folder(tmp_path / "img")
    spoil(root / "train" / "a" / "04.png", "not_an_image")
    bundle = build_datasets(_cfg(root, "error"))
    train_loader, _, _ = build_loaders(bundle, 8, 0, 1, seed=0, num_workers=workers)
    with pytest.raises(CorruptSample) as info:
        list(Checked(train_loader, ONE_PROCESS, lockstep=True))
    line = str(info.value)
    assert "\n" not in line and "Traceback" not in line
    assert "train/a/04.png" in line and "on rank 0" in line and "data.on_corrupt=skip" in line

    bundle = build_datasets(_cfg(root, "skip"))
    train_loader, _, sampler = build_loaders(bundle, 8, 0, 1, seed=0, num_workers=workers)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(Checked(train_loader, ONE_PROCESS, lockstep=True))
        assert [len(x) for x, _ in batches] == [8] * 5
        assert count_skipped(train_loader, 5) == 1  # 40 samples, 5 batches of 8: one pass over it
        assert count_skipped(train_loader, 0) == 0


def test_file_removed_mid_run_stops_with_the_checkpoints_untouched(tmp_path):
    """A file deleted after epoch 0: epoch 1 stops with CorruptSample; epoch 0's checkpoint stays."""
    root = make_folder(tmp_path / "img")
    cfg = compose(["data=imagefolder", f"data.root={root}", "data.image_size=8", "model=convnet",
                   "mode=sgd", "trainer.epochs=2", "trainer.batch_size=8", "wandb.mode=disabled",
                   "trainer.progress=false"])
    run_dir = tmp_path / "run"
    saved: dict[str, str] = {}

    def remove_after_epoch_0(epoch, *_):
        if epoch == 0:
            spoil(root / "train" / "b" / "07.png", "missing")
            saved.update({p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                          for p in (run_dir / "checkpoints").iterdir()})

    with pytest.raises(CorruptSample, match=r"'.*train/b/07.png' \(index \d+, FileNotFoundError"):
        train(cfg, run_dir, on_epoch_end=remove_after_epoch_0)
    assert saved and {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                      for p in (run_dir / "checkpoints").iterdir()} == saved


def _train_cmd(root: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["launch/train.py", "data=imagefolder", f"data.root={root}", "trainer.batch_size=8",
            "data.image_size=16", "model=convnet", "wandb.mode=disabled", "trainer.progress=false",
            f"hydra.run.dir={run_dir}", *extra]


def test_entry_point_corrupt_sample_is_one_line_exit_2_or_a_counted_skip(tmp_path):
    """The issue's run: ImageFolder + train/a/bad.png that is not an image."""
    root = make_folder(tmp_path / "img", n_train=39)
    (root / "train" / "a" / "bad.png").write_bytes(b"not an image")
    proc = run([sys.executable, *_train_cmd(root, tmp_path / "r", "trainer.epochs=1")], timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("distlocal: error: cannot read sample '"), proc.stderr
    assert "train/a/bad.png' (index " in lines[0] and "on rank 0" in lines[0]
    assert "data.on_corrupt" in lines[0]

    proc = check_ok(run([sys.executable, *_train_cmd(root, tmp_path / "s", "trainer.epochs=2",
                                                     "data.on_corrupt=skip")], timeout=120))
    assert proc.stderr.count("skipping unreadable sample") == 1 and "bad.png" in proc.stderr
    rows = [json.loads(ln) for ln in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert [r["data_skipped"] for r in rows] == [1, 1]  # 40 samples, 5 batches of 8: every pass
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["data_skipped"] == 2


def test_resume_across_a_skip_is_exact(tmp_path):
    """Killed in epoch 2 after a mid-epoch checkpoint, resumed: the same rows (data_skipped
    included) and bit-identical weights as the uninterrupted run, augmentation on."""
    root = make_folder(tmp_path / "img", n_train=39)
    (root / "train" / "a" / "bad.png").write_bytes(b"not an image")
    args = ["data=imagefolder", f"data.root={root}", "data.image_size=8", "data.on_corrupt=skip",
            "model=convnet", "mode=local", "trainer.epochs=3", "trainer.batch_size=8",
            "trainer.deterministic=true", "schedule.warmup_epochs=1", "checkpoint.every_steps=2",
            "wandb.mode=disabled", "trainer.progress=false", "resume=auto"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    check_ok(run([sys.executable, str(WORKER), str(full), *args], timeout=300))
    assert _cut_mid_epoch_2(cut, *args)["mid_epoch"]
    check_ok(run([sys.executable, str(WORKER), str(cut), *args], timeout=300))
    _assert_same_run(full, cut)
    rows = [json.loads(ln) for ln in (full / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["data_skipped"] for r in rows] == [1, 1, 1]


@pytest.mark.dist
@pytest.mark.parametrize("split", ["train", "val"])
def test_two_ranks_stop_together_on_one_line(tmp_path, split):
    """One rank meets the bad file (in a training batch, or in its shard of the evaluation); every
    rank stops with that rank's line, exit 2, through DataLoader workers."""
    root = make_folder(tmp_path / "img")
    (root / split / "a" / "bad.png").write_bytes(b"not an image")
    # torchrun's default monitor interval can SIGTERM the slower rank before it prints its own
    # line (the first rank to exit fails the group); 2 s lets both ranks leave on their own.
    proc = torchrun(_train_cmd(root, tmp_path / "r", "trainer.epochs=1", "data.num_workers=2"),
                    timeout=180, launcher=["--monitor-interval=2"])
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("distlocal: error: ")]
    assert len(lines) == 2 and lines[0] == lines[1], proc.stderr
    assert f"{split}/a/bad.png' (index " in lines[0] and "data.on_corrupt" in lines[0]
    assert "CorruptSample" not in proc.stderr and "PIL" not in proc.stderr  # no rank's traceback
    assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.dist
def test_two_ranks_skip_counts_once_per_pass(tmp_path):
    root = make_folder(tmp_path / "img", n_train=39)
    (root / "train" / "a" / "bad.png").write_bytes(b"not an image")
    check_ok(torchrun(_train_cmd(root, tmp_path / "r", "trainer.epochs=2", "data.num_workers=2",
                                 "data.on_corrupt=skip"), timeout=180))
    rows = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["data_skipped"] for r in rows] == [1, 1]  # batch 8 = 2 ranks x 4: every sample, every pass
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["data_skipped"] == 2
