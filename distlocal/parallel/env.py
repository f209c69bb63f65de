"""Process-group set-up shared by torchrun, the deepspeed launcher and plain ``python``."""

from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

from distlocal.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: its rank, the world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files, logs and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                "trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    if device == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"unknown trainer.device '{device}'; valid: auto, cpu, cuda")


def init_distributed(device: str = "auto", backend: str = "auto", timeout_s: float = 600.0) -> DistEnv:
    """Join the process group described by the launcher's env vars (idempotent).

    ``torchrun`` and the ``deepspeed`` launcher both set ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; a plain ``python`` run has none and
    stays a single process without a process group. Every collective gets ``timeout_s``, so a
    dead rank ends the job with an error instead of a hang.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        if backend not in ("gloo", "nccl"):
            raise ConfigError(f"unknown engine.backend '{backend}'; valid: auto, gloo, nccl")
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        timeout = datetime.timedelta(seconds=timeout_s)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = None
        if attempt != "0":
            # Under torchrun the workers share the elastic agent's store, and it outlives a
            # restart: without a per-attempt prefix the restarted ranks read the dead attempt's
            # addresses (gloo: "connectFullMesh failed ... Connection refused").
            base, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
            store = dist.PrefixStore(f"distlocal/attempt_{attempt}", base)
        dist.init_process_group(
            backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout, **kwargs
        )
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def _collective_tensor(values: list[float], env: DistEnv) -> torch.Tensor:
    """``values`` as float64 where the backend reduces: the device under NCCL, else the host."""
    t = torch.tensor(values, dtype=torch.float64)
    return t.to(env.device) if env.distributed and dist.get_backend() == "nccl" else t


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum a few scalars across ranks in one collective (epoch metrics)."""
    t = _collective_tensor(values, env)
    if env.distributed:
        dist.all_reduce(t)
    return t.cpu().tolist()


def all_gather_floats(values: list[float], env: DistEnv) -> list[list[float]]:
    """Every rank's ``values``, by rank (one small all-gather; a collective: every rank calls it)."""
    t = _collective_tensor(values, env)
    if not env.distributed:
        return [t.tolist()]
    parts = [torch.empty_like(t) for _ in range(env.world_size)]
    dist.all_gather(parts, t)
    return [p.cpu().tolist() for p in parts]


def broadcast_object(obj: object, env: DistEnv) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def exit_together(code: int) -> NoReturn:
    """End this rank's process with ``code`` at the moment every other rank does the same.

    For a run that finished (``code`` 0, from ``launch/train.py``) and for an error that every
    rank raised at the same point of the loop (a failed checkpoint write, which rank 0 broadcasts;
    a diverged local rule, decided on the averaged deltas). Why not ``sys.exit``: torchrun SIGTERMs
    the ranks still running as soon as one has failed, and a rank with more to tear down (rank 0:
    wandb; any rank: DeepSpeed, gloo and the interpreter's own shutdown, seconds under load) then
    ended with -15 or -6 instead of the code it chose, its last work (wandb's final sync) cut
    short. And the interpreter's teardown itself can abort a rank whose work is done ("terminate
    called without an active exception", SIGABRT): a gloo group left to finalization does
    (pytorch/pytorch#190489), and about one 2-rank job in several hundred did even after
    ``destroy_process_group``. So the slow part runs first (wandb's run marked with ``code``, the
    log files flushed), a barrier waits for every rank to be done with it, each rank leaves the
    process group (nobody talks to it any more), and then each process leaves at once, without a
    second teardown that could outlast the agent's next look or abort.
    """
    if not dist.is_initialized():
        sys.exit(code)  # one process: nobody to wait for, and the usual teardown finishes wandb
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=code)
    logging.shutdown()
    try:
        dist.barrier()
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - a rank already gone: leave anyway, with the same code
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
