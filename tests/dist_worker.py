"""Run ``train()`` alone or under torchrun for the distributed and resume tests.

    python tests/dist_worker.py OUT_DIR override [override ...]

Writes ``OUT_DIR/run`` (the run directory) and, from rank 0, ``OUT_DIR/replicas.json``: per
epoch, the largest absolute difference between the ranks' parameters and buffers.

Fault injection (environment):
- ``EXIT_AFTER_EPOCH=N``: every rank exits (code 0, no clean-up) after epoch N's checkpoint.
- ``KILL_AT=E:S``: on the first attempt of an elastic job (``TORCHELASTIC_RESTART_COUNT=0``)
  rank 1 sends itself SIGKILL after step S of epoch E.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from distlocal.config import compose
from distlocal.trainer import train


def main() -> None:
    out = Path(sys.argv[1])
    cfg = compose(sys.argv[2:])
    diffs: list[float] = []
    exit_after = os.environ.get("EXIT_AFTER_EPOCH")
    kill_at = os.environ.get("KILL_AT")

    def compare_replicas(epoch, model, learner, engine) -> None:
        flat = torch.cat([t.detach().double().reshape(-1) for t in model.state_dict().values()])
        if dist.is_initialized():
            gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, flat)
            diffs.append(max(float((g - gathered[0]).abs().max()) for g in gathered))
        else:
            diffs.append(0.0)
        if exit_after is not None and epoch == int(exit_after):
            if dist.is_initialized():  # leave the group first, or gloo aborts the slower rank
                dist.barrier()
                dist.destroy_process_group()
            os._exit(0)

    def maybe_kill(epoch: int, step: int) -> None:
        if kill_at is None or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            return
        if f"{epoch}:{step}" == kill_at and int(os.environ.get("RANK", "0")) == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    train(cfg, out / "run", on_epoch_end=compare_replicas, on_step_end=maybe_kill)
    if not dist.is_initialized() or dist.get_rank() == 0:
        (out / "replicas.json").write_text(json.dumps(diffs))
    if dist.is_initialized():
        dist.barrier()  # nobody leaves while a peer still talks to it (gloo aborts otherwise)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
