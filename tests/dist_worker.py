"""Run ``train()`` alone or under torchrun for the distributed tests.

    python tests/dist_worker.py OUT_DIR override [override ...]

Writes ``OUT_DIR/run`` (the run directory) and, from rank 0, ``OUT_DIR/replicas.json``: per
epoch, the largest absolute difference between the ranks' parameters and buffers.
"""

from __future__ import annotations

import json
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

    def compare_replicas(epoch, model, learner, engine) -> None:
        flat = torch.cat([t.detach().double().reshape(-1) for t in model.state_dict().values()])
        if dist.is_initialized():
            gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, flat)
            diffs.append(max(float((g - gathered[0]).abs().max()) for g in gathered))
        else:
            diffs.append(0.0)

    train(cfg, out / "run", on_epoch_end=compare_replicas)
    if not dist.is_initialized() or dist.get_rank() == 0:
        (out / "replicas.json").write_text(json.dumps(diffs))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
