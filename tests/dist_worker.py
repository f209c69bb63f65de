"""Run ``train()`` alone or under torchrun for the distributed and resume tests.

    python tests/dist_worker.py OUT_DIR override [override ...]
    python tests/dist_worker.py --launch override [override ...]

Writes ``OUT_DIR/run`` (the run directory) and, from rank 0, ``OUT_DIR/replicas.json``: per
epoch, the largest absolute difference between the ranks' parameters and buffers. ``--launch``
runs the entry point ``launch/train.py`` instead (its one-line errors and exit codes), with the
same fault injection.

Fault injection (environment):
- ``EXIT_AFTER_EPOCH=N``: every rank exits (code 0, no clean-up) after epoch N's checkpoint.
- ``KILL_IN_SYNC=N``: on the first attempt of an elastic job (``TORCHELASTIC_RESTART_COUNT=0``)
  rank 1 sends itself SIGKILL in its N-th delta sync, while rank 0 waits in that all-reduce
  (with ``local.sync_async=true``: right after rank 1 launched it, so it dies with it in flight).
- ``BAD_DELTA=N:nan,M:inf``: rank 1 writes NaN (Inf) into its delta buffer just before its N-th
  (M-th) delta sync; each rank writes ``OUT_DIR/bad_delta_rank<r>.json``: per injection, whether
  its local weights came out of that sync unchanged and the skip counter before and after.
- ``ENOSPC_IN_SAVE=N``: the N-th checkpoint write (rank 0 writes them) stops half-way with
  ``OSError(ENOSPC)``, as on a full disk: the first half of the real file's bytes, then the error.

They wrap ``DeltaSync.start``/``finish`` and ``torch.save`` here, in the worker: the library is not
touched.
"""

from __future__ import annotations

import errno
import io
import json
import os
import runpy
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from distlocal.config import compose
from distlocal.parallel.env import exit_together
from distlocal.parallel.sync import DeltaSync
from distlocal.trainer import train


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _inject_faults(out: Path) -> None:
    """Wrap DeltaSync.start/finish for KILL_IN_SYNC and BAD_DELTA (see the module doc)."""
    kill = os.environ.get("KILL_IN_SYNC")
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        kill = None  # the restarted attempt runs clean
    bad = dict(item.split(":") for item in os.environ.get("BAD_DELTA", "").split(",") if item)
    if kill is None and not bad:
        return
    start, finish = DeltaSync.start, DeltaSync.finish
    calls = [0]
    seen: dict[str, dict] = {}

    def local_weights(sync: DeltaSync) -> torch.Tensor:
        stages = sync.learner.model.stages[: sync.learner.boundary]
        return torch.cat([p.detach().reshape(-1).clone() for s in stages for p in s.parameters()])

    def faulty_start(self: DeltaSync) -> None:
        calls[0] += 1
        n = str(calls[0])
        killed_here = kill == n and _rank() == 1
        if killed_here and not self.sync_async:
            os.kill(os.getpid(), signal.SIGKILL)  # rank 0 is (or soon will be) inside the all-reduce
        if n in bad:
            seen[n] = {"before": local_weights(self), "skipped_before": self.learner.skipped_updates}
            if _rank() == 1:
                self.learner.buffer[0] = float(bad[n])  # "nan" or "inf"
        start(self)
        if killed_here:  # async: launched, not awaited; rank 0 will wait for it in finish()
            os.kill(os.getpid(), signal.SIGKILL)

    def checked_finish(self: DeltaSync) -> float | None:
        loss = finish(self)
        n = str(calls[0])
        if n in seen and "unchanged" not in seen[n]:
            seen[n]["unchanged"] = bool(torch.equal(seen[n].pop("before"), local_weights(self)))
            seen[n]["skipped_after"] = self.learner.skipped_updates
            (out / f"bad_delta_rank{_rank()}.json").write_text(json.dumps(seen))
        return loss

    DeltaSync.start, DeltaSync.finish = faulty_start, checked_finish


def _fail_save(nth: int) -> None:
    """The ``nth`` torch.save (checkpoint writes: nothing else saves in a run) writes half its
    bytes, then raises ENOSPC, like a disk filling up part-way through the file."""
    real_save = torch.save
    calls = [0]

    def save(obj, f, *args, **kwargs) -> None:  # noqa: ANN001
        calls[0] += 1
        if calls[0] != nth:
            return real_save(obj, f, *args, **kwargs)
        whole = io.BytesIO()
        real_save(obj, whole, *args, **kwargs)
        f.write(whole.getvalue()[: len(whole.getvalue()) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    torch.save = save


def main() -> None:
    if os.environ.get("ENOSPC_IN_SAVE"):
        _fail_save(int(os.environ["ENOSPC_IN_SAVE"]))
    if sys.argv[1] == "--launch":  # the entry point, as a user runs it
        _inject_faults(Path.cwd())
        sys.argv = ["launch/train.py", *sys.argv[2:]]
        runpy.run_path("launch/train.py", run_name="__main__")
        return
    out = Path(sys.argv[1])
    cfg = compose(sys.argv[2:])
    diffs: list[float] = []
    exit_after = os.environ.get("EXIT_AFTER_EPOCH")
    _inject_faults(out)

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

    train(cfg, out / "run", on_epoch_end=compare_replicas)
    if not dist.is_initialized() or dist.get_rank() == 0:
        (out / "replicas.json").write_text(json.dumps(diffs))
    exit_together(0)  # leave the group and the process together, skipping the interpreter's teardown


if __name__ == "__main__":
    main()
