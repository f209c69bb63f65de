"""The entry point: one-line errors, argv clean-up, and the run-directory contract under torchrun."""

from __future__ import annotations

import csv
import json
import os
import sys

import pytest
import torch
from conftest import REPO, check_ok, run, torchrun

from distlocal.cli import explain, strip_local_rank
from distlocal.config import compose

TRAIN = ["launch/train.py"]


def _one_line_error(proc) -> str:
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("distlocal: error: ")
    return lines[0]


def test_unknown_model_is_one_line_naming_valid_models(tmp_path):
    line = _one_line_error(run([sys.executable, *TRAIN, "model=nonexistent", f"hydra.run.dir={tmp_path}/r"]))
    assert "nonexistent" in line and "resnet18" in line and "convnet" in line and "tv:" in line
    assert not (tmp_path / "r").exists()


def test_unknown_data_set_is_one_line(tmp_path):
    line = _one_line_error(run([sys.executable, *TRAIN, "data=imagenette", f"hydra.run.dir={tmp_path}/r"]))
    # Only the options in configs/data/: no schema entry (base_data), no Hydra search path.
    assert line == ("distlocal: error: unknown data 'imagenette'; "
                    "valid: cifar10, cifar100, digits, fashion_mnist, imagefolder, synthetic")


def test_misspelled_key_is_one_line(tmp_path):
    line = _one_line_error(run([sys.executable, *TRAIN, "trainer.epoch=3", f"hydra.run.dir={tmp_path}/r"]))
    assert "trainer.epoch" in line


def test_wrong_type_is_one_line(tmp_path):
    line = _one_line_error(
        run([sys.executable, *TRAIN, "trainer.epochs=many", f"hydra.run.dir={tmp_path}/r"])
    )
    assert "trainer.epochs" in line


def test_missing_cifar_is_one_line_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "r"
    line = _one_line_error(
        run(
            [
                sys.executable,
                *TRAIN,
                "data=cifar10",
                f"data.root={tmp_path}/nowhere",
                "wandb.mode=disabled",
                f"hydra.run.dir={run_dir}",
            ]
        )
    )
    assert "data.root" in line and "data.download=true" in line
    assert not run_dir.exists()  # found by the pre-check, before Hydra writes .hydra/ there


def test_unknown_experiment_lists_the_experiments():
    try:
        compose(["+experiment=nope"])
    except Exception as exc:  # noqa: BLE001
        msg = explain(exc)
    names = msg.split("valid: ", 1)[1].split(", ")
    assert msg.startswith("unknown experiment 'nope'; valid: ")
    assert {"cifar10_resnet18", "fashion_convnet"} <= set(names)
    assert all("=" not in n and "/" not in n and not n.startswith("base") for n in names)


def test_strip_local_rank():
    assert strip_local_rank(["--local_rank=1", "mode=sgd"]) == ["mode=sgd"]
    assert strip_local_rank(["--local-rank=0", "a=1"]) == ["a=1"]
    assert strip_local_rank(["--local_rank", "3", "a=1"]) == ["a=1"]


def test_explain_is_one_line():
    try:
        compose(["schedule=sometimes"])
    except Exception as exc:  # noqa: BLE001
        msg = explain(exc)
    assert msg == "unknown schedule 'sometimes'; valid: dynamic, static"


# Imported by every process of the torchrun job below (PYTHONPATH): when a rank's process ends,
# through os._exit or the interpreter's own exit, it writes how, and whether its process group
# was still alive.
_EXIT_PROBE = """
import atexit, os, sys

def _probe(how):
    dist = sys.modules.get("torch.distributed")
    if "RANK" in os.environ and dist is not None:
        with open(os.path.join({out!r}, "rank" + os.environ["RANK"]), "w") as f:
            f.write(how + " initialized=" + str(dist.is_initialized()))

_real_exit = os._exit

def _exit(code):
    _probe("_exit(" + str(code) + ")")
    _real_exit(code)

os._exit = _exit
atexit.register(_probe, "interpreter exit")
"""


def test_torchrun_writes_run_dir_once_from_rank0(tmp_path):
    run_dir = tmp_path / "x"
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(_EXIT_PROBE.format(out=str(probe)))
    proc = check_ok(
        torchrun(
            [
                *TRAIN,
                "mode=sgd",
                "data=digits",
                "model=convnet",
                "trainer.epochs=2",
                "wandb.mode=disabled",
                "trainer.progress=false",
                f"hydra.run.dir={run_dir}",
            ],
            PYTHONPATH=f"{probe}{os.pathsep}{REPO}",
        )
    )
    # Every rank left its process group, then its process without the interpreter's teardown: that
    # teardown can abort a rank (SIGABRT, "terminate called without an active exception") after a
    # run that succeeded, and torchrun then fails the job.
    ended = {f.name: f.read_text() for f in probe.glob("rank*")}
    assert ended == {"rank0": "_exit(0) initialized=False", "rank1": "_exit(0) initialized=False"}
    assert proc.stdout.count("run dir") == 1  # printed by rank 0 alone
    assert (run_dir / "config.yaml").read_text().count("model: convnet") == 1
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]  # once per epoch, not once per rank
    for key in ("train_loss", "test_loss", "test_acc", "epoch_time_s", "samples_per_s", "lr"):
        assert all(isinstance(r[key], float) for r in rows), key
    with (run_dir / "summary.csv").open() as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1]
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1
    assert ckpt["model"] and not any(k.startswith("module.") for k in ckpt["model"])
    assert all(r["boundary"] == 0 for r in rows)


def test_failed_checkpoint_write_is_one_line_exit_3_and_keeps_the_previous(tmp_path):
    """A checkpoint that cannot be written stops the run with one line and exit 3 (resume=auto
    can go on), and last.pt still holds the previous complete checkpoint."""
    run_dir = tmp_path / "r"
    # epoch_0001.pt's temporary file cannot be created: a directory holds its name.
    (run_dir / "checkpoints" / "epoch_0001.pt.tmp").mkdir(parents=True)
    proc = run([sys.executable, *TRAIN, "mode=sgd", "data=digits", "model=convnet", "trainer.epochs=2",
                "trainer.max_steps_per_epoch=2", "wandb.mode=disabled", "trainer.progress=false",
                f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 3, proc.stderr
    line = _one_line_error(proc)
    assert "epoch_0001.pt" in line and "last.pt still holds the previous checkpoint" in line
    assert "resume=auto" in line
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 0
    assert not (run_dir / "checkpoints" / "epoch_0001.pt").exists()


def test_every_rank_die_marks_the_wandb_run_failed_before_leaving(monkeypatch, capsys, one_rank_group):
    """In a process group, ``die(..., every_rank=True)`` skips the interpreter's teardown
    (``os._exit``), so it must finish wandb itself, with the exit code, before it leaves; the one
    line is printed first."""
    from types import SimpleNamespace

    import distlocal.parallel.env as env_mod
    from distlocal import cli

    calls = []
    fake_wandb = SimpleNamespace(run=object(), finish=lambda exit_code: calls.append(("finish", exit_code)))
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)

    def fake_exit(code: int) -> None:
        calls.append(("exit", code))
        raise SystemExit(code)

    monkeypatch.setattr(env_mod.os, "_exit", fake_exit)
    with pytest.raises(SystemExit) as exc:
        cli.die("disk  full", code=3, every_rank=True)
    assert exc.value.code == 3
    assert calls == [("finish", 3), ("exit", 3)]
    assert not torch.distributed.is_initialized()  # the group was left before the process
    assert capsys.readouterr().err == "distlocal: error: disk full\n"
