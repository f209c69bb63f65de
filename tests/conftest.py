"""Shared helpers: run the entry point or a worker as a subprocess, bounded by a timeout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "dist_worker.py"


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: one thread per rank, no wandb network, repo importable."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        WANDB_MODE="disabled",
        WANDB_SILENT="true",
        HYDRA_FULL_ERROR="0",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.update(extra)
    return env


def run(args: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """Run a command from the repo root; a hang fails the test instead of stalling CI."""
    try:
        return subprocess.run(
            args, cwd=REPO, env=subprocess_env(**env), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"timed out after {timeout}s: {' '.join(args)}\n{exc.stdout}\n{exc.stderr}")


def torchrun(
    args: list[str], nproc: int = 2, timeout: float = 300, launcher: list[str] | None = None, **env: str
) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=N [launcher args]`` (gloo on CPU) on ``args``."""
    return run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         *(launcher or []), *args],
        timeout=timeout,
        **env,
    )


def check_ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Fail with the child's output when it did not exit 0."""
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    )
    return proc


class _OneRankGroupEnv:
    """Stand-in for :class:`distlocal.parallel.env.DistEnv` on a 1-rank process group that still takes the
    multi-rank code paths (``distributed`` is true): the all-reduces run, over one rank."""

    rank, world_size, local_rank, is_main, distributed = 0, 1, 0, True, True
    device = __import__("torch").device("cpu")


@pytest.fixture
def one_rank_group() -> _OneRankGroupEnv:
    """A 1-rank gloo process group in this process (in-memory store), destroyed afterwards."""
    import torch.distributed as dist

    owned = not dist.is_initialized()  # an in-process DeepSpeed test may have made one already
    if owned:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    assert dist.get_world_size() == 1
    yield _OneRankGroupEnv()
    if owned and dist.is_initialized():  # exit_together leaves the group itself
        dist.destroy_process_group()
