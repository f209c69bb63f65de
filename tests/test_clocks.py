"""The training clocks (distlocal/profiler/clocks.py) on fake clocks: what counts, what pauses, what
resumes."""

from __future__ import annotations

import json
import textwrap
import time

import pytest
import torch
from conftest import check_ok, torchrun

from distlocal.parallel.env import DistEnv
from distlocal.profiler.clocks import TrainClocks

ONE = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class Fake:
    """A clock the test advances by hand."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _get(r: dict, *keys: str) -> tuple:
    return tuple(r[k] for k in keys)


def _clocks() -> tuple[TrainClocks, Fake, Fake]:
    cpu, wall = Fake(), Fake()
    return TrainClocks("cpu", cpu=cpu, wall=wall), cpu, wall


def test_evaluation_time_is_in_no_clock_and_totals_accumulate():
    c, cpu, wall = _clocks()
    c.start_epoch()
    cpu.t, wall.t = 2.0, 5.0
    assert c.pause() == 5.0
    cpu.t, wall.t = 10.0, 50.0  # an evaluation: neither clock counts it
    r = c.read(ONE)
    assert (r["epoch_cpu_s"], r["train_cpu_s"], r["train_wall_s"]) == (2.0, 2.0, 5.0)
    c.resume()
    cpu.t, wall.t = 11.0, 53.0
    assert c.pause() == 8.0
    r = c.read(ONE)
    assert _get(r, "epoch_cpu_s", "epoch_cpu_max_s", "train_cpu_s", "train_wall_s") == (3.0, 3.0, 3.0, 8.0)
    assert r["epoch_device_s"] is None and r["train_device_s"] is None  # no device clock off CUDA
    c.end_epoch()
    c.start_epoch()
    cpu.t, wall.t = 15.0, 60.0
    c.pause()
    r = c.read(ONE)
    assert (r["epoch_cpu_s"], r["train_cpu_s"], r["train_wall_s"]) == (4.0, 7.0, 15.0)


def test_a_reading_while_running_counts_the_segment_so_far():
    c, cpu, wall = _clocks()
    c.start_epoch()
    cpu.t, wall.t = 1.5, 4.0
    r = c.read(ONE)  # a mid-epoch checkpoint reads while the loop runs
    assert (r["epoch_cpu_s"], r["train_wall_s"]) == (1.5, 4.0)
    cpu.t, wall.t = 2.0, 6.0
    c.pause()
    assert c.read(ONE)["train_cpu_s"] == 2.0  # the read did not stop or double-count the segment


def test_a_restored_run_adds_its_own_time_to_the_checkpoint_totals():
    c, cpu, wall = _clocks()
    c.start_epoch()
    cpu.t, wall.t = 3.0, 9.0
    state = c.state_dict(ONE)
    assert state == {"wall": 9.0, "cpu": 3.0, "cpu_max": 3.0, "device": 0.0}
    d, cpu2, wall2 = _clocks()
    cpu2.t, wall2.t = 100.0, 100.0  # a new process: its clocks start anywhere
    d.load_state_dict(state)
    d.start_epoch()
    cpu2.t, wall2.t = 101.0, 102.0
    d.pause()
    r = d.read(ONE)
    assert _get(r, "epoch_cpu_s", "train_cpu_s", "train_cpu_max_s", "train_wall_s") == (1.0, 4.0, 4.0, 11.0)


def test_the_real_cpu_clock_ignores_sleep_and_counts_work():
    c = TrainClocks("cpu")
    c.start_epoch()
    time.sleep(0.3)  # blocked, as behind a busy machine's scheduler: not CPU time
    c.pause()
    r = c.read(ONE)
    assert r["train_wall_s"] >= 0.3
    assert r["epoch_cpu_s"] < 0.2


_TWO_RANKS = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    from distlocal.profiler.clocks import TrainClocks
    from distlocal.parallel.env import DistEnv
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    t = {"cpu": 0.0, "wall": 0.0}
    c = TrainClocks("cpu", cpu=lambda: t["cpu"], wall=lambda: t["wall"])
    c.load_state_dict({"wall": 1.0, "cpu": 10.0, "cpu_max": 6.0, "device": 0.0})
    c.start_epoch()
    t["cpu"], t["wall"] = (2.0, 7.0) if rank == 0 else (5.0, 8.0)
    c.pause()
    r = c.read(DistEnv(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu")))
    if rank == 0:
        open(sys.argv[1], "w").write(json.dumps(r))
    dist.destroy_process_group()
""")


@pytest.mark.dist
def test_two_ranks_sum_and_max_the_cpu_clock(tmp_path):
    script, out = tmp_path / "two.py", tmp_path / "r.json"
    script.write_text(_TWO_RANKS)
    check_ok(torchrun([str(script), str(out)], timeout=120))
    r = json.loads(out.read_text())
    assert r["epoch_cpu_s"] == 7.0 and r["epoch_cpu_max_s"] == 5.0  # sum and max over the ranks
    assert r["train_cpu_s"] == 17.0 and r["train_cpu_max_s"] == 11.0  # the restored totals added
    assert r["train_wall_s"] == 8.0  # wall: rank 0's, as epoch_time_s
