"""The profiler: exact activation bytes, the footprint by category against a hand count, the epoch
plan's whole lever periods, step times and speedup on a fake clock (also through a full run), a
reference that leaves the run alone, and the bench/compare scripts on tiny inputs."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from distlocal.config import DDPEngineConfig, ProfilerConfig, TrainerConfig
from distlocal.local.learner import LocalLearner
from distlocal.local.rules import make_rule
from distlocal.models import StagedModel, build_model
from distlocal.parallel.ddp import DDPEngine
from distlocal.parallel.engine import drop_from_optimizer
from distlocal.parallel.env import DistEnv
from distlocal.parallel.sync import DeltaSync
from distlocal.profiler import (
    HEADLINE_KEYS,
    ActivationCounter,
    Profiler,
    device_memory,
    headline,
    nvml_used_bytes,
    plan_epoch,
    saved_activation_bytes,
)
from distlocal.profiler.activations import CountingProbe
from distlocal.step import StepParts, set_boundary, train_step
from distlocal.tta import with_time_to_accuracy

REPO = Path(__file__).resolve().parent.parent
B, D, H, C = 5, 7, 11, 3  # batch, input, hidden, classes: distinct primes so a wrong term shows
F32, I64 = 4, 8
ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _counted_step(model: StagedModel, learner: LocalLearner, boundary: int, x: torch.Tensor,
                  y: torch.Tensor) -> ActivationCounter:
    """One step of distlocal.step.train_step at ``boundary`` (1-process DDP engine, lr 0), its saved
    bytes counted."""
    engine = DDPEngine(model, ENV, TrainerConfig(lr=0.0), DDPEngineConfig())
    set_boundary(learner, engine, boundary)
    counter = ActivationCounter(model.stages)
    train_step(StepParts(learner, engine, DeltaSync(learner, ENV)), x, y, 0, probe=CountingProbe(counter))
    return counter


def _load_script(name: str):
    """Import ``profiling/<name>.py`` (a script directory, not a package)."""
    spec = importlib.util.spec_from_file_location(f"_profiling_{name}", REPO / "profiling" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the script executes
    spec.loader.exec_module(mod)
    return mod


def _mlp() -> StagedModel:
    torch.manual_seed(0)
    return StagedModel([nn.Sequential(nn.Linear(D, H), nn.ReLU()),
                        nn.Sequential(nn.Linear(H, H), nn.Tanh()),
                        nn.Linear(H, C)])


# What autograd saves for one forward + cross-entropy of _mlp() (checked against PyTorch 2.14):
#   Linear (addmm)  saves its input (for dW); W^T only when its input needs grad — and W^T is a
#                   view of the parameter, never counted;
#   ReLU, Tanh      save their output;
#   cross_entropy   = log_softmax (saves its output) + nll_loss (saves that same output again,
#                   the int64 targets and a 0-dim float32 total_weight).
# Storages are counted once, so the tensor passed between stages is counted where first saved.
LOSS = B * C * F32 + B * I64 + 1 * F32        # log-softmax output, targets, total_weight
EXPECTED = {
    # stage 0: input x + ReLU out; stage 1: (its input = ReLU out, already counted) + Tanh out;
    # stage 2: its input = Tanh out, already counted.
    0: [B * D * F32 + B * H * F32, B * H * F32, 0],
    # stages [0, 1) run under no_grad: nothing saved; stage 1 saves its input h (now the first to
    # save it) and its Tanh output.
    1: [0, B * H * F32 + B * H * F32, 0],
    # only the classifier is trained: it saves its input h.
    2: [0, 0, B * H * F32],
}


@pytest.mark.parametrize("boundary", [0, 1, 2])
def test_activation_bytes_match_hand_count(boundary: int) -> None:
    model = _mlp()
    learner = LocalLearner(model, make_rule("softhebb"))
    learner.lr = 1e-3  # the hooks really compute deltas in the prefix (under no_grad)
    x, y = torch.randn(B, D), torch.randint(C, (B,))
    counter = _counted_step(model, learner, boundary, x, y)
    assert counter.per_stage == EXPECTED[boundary]
    assert counter.other == LOSS
    assert counter.total == sum(EXPECTED[boundary]) + LOSS
    assert all(b == 0 for b in counter.per_stage[:boundary])
    if boundary:
        assert float(learner.buffer.abs().sum()) == 0.0  # applied and cleared: the step ran fully


def test_saved_activation_bytes_function_and_view_dedup() -> None:
    model = _mlp()
    x = torch.randn(B, D)
    total, per_stage = saved_activation_bytes(lambda: model(x).sum(), model.stages)
    assert per_stage == EXPECTED[0]
    assert total == sum(EXPECTED[0])  # .sum() saves nothing
    # Two views of one 100-float storage, each saved by sin(): the storage counts once, in full.
    w = torch.ones(100, requires_grad=True)
    base = w * 2
    total, _ = saved_activation_bytes(lambda: (base[:10].sin() + base[10:20].sin()).sum(), [])
    assert total == 100 * F32


def test_split_step_on_a_convnet_shows_zero_local_bytes() -> None:
    torch.manual_seed(0)
    model = build_model("convnet", (3, 16, 16), 10)
    learner = LocalLearner(model, make_rule("softhebb"))
    learner.lr = 1e-3
    x, y = torch.randn(4, 3, 16, 16), torch.randint(10, (4,))
    full = _counted_step(model, learner, 0, x, y)
    split = _counted_step(model, learner, 3, x, y)
    assert split.per_stage[:3] == [0, 0, 0]
    assert all(b > 0 for b in full.per_stage[:3])
    assert 0 < split.total < full.total
    # Past the boundary's first stage (which now saves its input itself), stages match the full model.
    assert split.per_stage[4:] == full.per_stage[4:]


def test_device_memory_fields_without_gpu() -> None:
    pytest.importorskip("pynvml")  # nvidia-ml-py is a dependency; it must fail soft without a driver
    if torch.cuda.is_available():
        pytest.skip("checks the GPU-less path")
    assert nvml_used_bytes(0) is None
    mem = device_memory(torch.device("cpu"))
    assert mem["cuda_max_allocated_bytes"] is None
    assert mem["cuda_max_reserved_bytes"] is None
    assert mem["nvml_used_bytes"] is None
    assert mem["peak_rss_bytes"] > 0 and mem["rss_bytes"] > 0


def test_plan_epoch_times_whole_lever_periods() -> None:
    """Profiled and timed steps span whole lcm(update_every, sync_every) periods; the warm-up and
    footprint steps and an off-grid epoch-end flush are left out; reference steps sit among the
    timed steps."""
    for first, steps, u, s, sample, refs in [(0, 23, 1, 1, 3, 4), (0, 23, 4, 1, 3, 4), (0, 23, 1, 4, 3, 4),
                                             (5, 40, 4, 2, 3, 9), (0, 14, 4, 1, 1, 2), (0, 4, 1, 1, 3, 2)]:
        period = math.lcm(u, s)
        plan = plan_epoch(first, steps, period, s, sample, refs)
        assert plan.footprint_step == first + 1
        assert plan.profiled.start == first + 2 and plan.timed.start == plan.profiled.stop
        for r in (plan.profiled, plan.timed):
            assert len(r) % period == 0
            assert sum(1 for k in r if k % u == 0) == len(r) // u  # one delta per update_every
            syncs = sum(1 for k in r if (k + 1) % s == 0 or k == steps - 1)
            assert syncs == len(r) // s  # one all-reduce per sync_every, no extra flush
        assert len(plan.timed) >= period  # there was room: some steps are timed
        assert sum(plan.reference.values()) == refs and all(k in plan.timed for k in plan.reference)
    # Too short for one whole period after the dedicated steps: nothing is timed (no biased figure).
    assert len(plan_epoch(0, 5, 4, 1, 3, 4).timed) == 0


class _TinyEngine:
    """A single-process engine (what DDPEngine is without a process group): the suffix from the
    learner's boundary (0 without one), backward, step; ``clock`` advances by ``cost`` per step."""

    def __init__(self, model: StagedModel, clock: list[float] | None = None, cost: float = 0.0,
                 optimizer: torch.optim.Optimizer | None = None, learner: LocalLearner | None = None) -> None:
        self.model, self.clock, self.cost, self.learner, self.env = model, clock, cost, learner, ENV
        self.optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        boundary = self.learner.boundary if self.learner is not None else 0
        return self.model.forward_range(h, boundary, self.model.num_stages)

    def backward_step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.clock is not None:
            self.clock[0] += self.cost


def _epoch(prof: Profiler, model: StagedModel, learner: LocalLearner, opt: torch.optim.Optimizer,
           steps: int = 4, shape: tuple[int, ...] = (4, 3, 16, 16), classes: int = 10,
           clock: list[float] | None = None, cost: float = 0.0) -> dict:
    """One profiled 'epoch' the way the trainer drives it (see Trainer.train_step): the step is
    distlocal.step.train_step; with ``clock``, each step advances the fake clock by ``cost``."""
    prof.epoch_start(opt, steps=steps, boundary=learner.boundary)
    parts = StepParts(learner, _TinyEngine(model, optimizer=opt, learner=learner),
                      DeltaSync(learner, ENV, timer=prof.phase))
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)  # not the global RNG: tests check the profiler leaves it alone
    x, y = torch.randn(shape, generator=g).to(dev), torch.randint(classes, (shape[0],), generator=g).to(dev)
    for step in range(steps):
        prof.step_begin(step)
        with prof.phase("data"):
            xs, ys = x.clone(), y.clone()
        with prof.footprint((model,), (opt,), (learner.buffer,)):
            train_step(parts, xs, ys, step, last=step == steps - 1, probe=prof)
        if clock is not None:
            clock[0] += cost
        prof.step_end()
    return prof.epoch_end(learner.boundary, opt)


P_ALL = ((D * H + H) + (H * H + H) + (H * C + C)) * F32
P_LAST = (H * C + C) * F32


def test_footprint_hand_count_through_the_profiler() -> None:
    """The profiler's footprint step of _mlp(), by category, against a hand count."""
    model = _mlp()
    learner = LocalLearner(model, make_rule("freeze"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    prof = Profiler(ProfilerConfig(), model, "cpu", verbose=False)
    r0 = _epoch(prof, model, learner, opt, steps=3, shape=(B, D), classes=C)
    # All-SGD: every parameter, its gradient and its momentum are alive at the peak.
    assert r0["footprint_param_bytes"] == r0["footprint_grad_bytes"] == r0["footprint_optim_bytes"] == P_ALL
    assert r0["activation_bytes"] == sum(EXPECTED[0]) + LOSS  # saved for backward, exactly
    assert r0["footprint_ref_bytes"] == r0["footprint_bytes"]  # boundary 0: the run is the reference
    # Boundary 2 (freeze): only the classifier has a gradient and momentum; the learner's buffer is
    # the two loss slots. The peak is now in the prefix forward (no_grad): the stage-0 output, the
    # second Linear's output and its Tanh output are alive, 3 x B x H floats.
    drop_from_optimizer(opt, learner.set_boundary(2))
    clock = [0.0]
    prof2 = Profiler(ProfilerConfig(), model, "cpu", verbose=False, clock=lambda: clock[0])
    batch = (torch.randn(B, D), torch.randint(C, (B,)))
    prof2.attach_reference(lambda m: _TinyEngine(m), lambda: iter([batch]))
    r2 = _epoch(prof2, model, learner, opt, steps=3, shape=(B, D), classes=C)
    assert r2["footprint_param_bytes"] == P_ALL
    assert r2["footprint_grad_bytes"] == r2["footprint_optim_bytes"] == P_LAST
    assert r2["footprint_local_bytes"] == 2 * F32
    assert r2["footprint_activation_bytes"] == 3 * B * H * F32
    assert r2["footprint_bytes"] == P_ALL + 2 * P_LAST + 2 * F32 + 3 * B * H * F32
    assert r2["activation_bytes"] == sum(EXPECTED[2]) + LOSS
    # The reference (a boundary-0 copy behind its own engine): every parameter trains again.
    assert r2["footprint_ref_param_bytes"] == r2["footprint_ref_grad_bytes"] == P_ALL
    assert r2["footprint_ref_optim_bytes"] == P_ALL
    assert r2["activation_bytes_ref"] == r0["activation_bytes"]
    assert r2["footprint_reduction"] == r2["footprint_ref_bytes"] / r2["footprint_bytes"]
    assert r2["activation_reduction"] == r2["activation_bytes_ref"] / r2["activation_bytes"]


def test_speedup_from_a_fake_clock_and_the_reference_leaves_the_run_alone() -> None:
    """Step times from a fake clock: the run's steps cost 2, the reference's 3 (its engine advances
    the clock); step_time_s, the reference, speedup and the summary follow exactly. The reference
    copy never touches the run's weights, BN statistics, requires_grad or RNG."""
    torch.manual_seed(0)
    model = build_model("convnet", (3, 16, 16), 10)
    learner = LocalLearner(model, make_rule("freeze"))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    clock = [0.0]
    prof = Profiler(ProfilerConfig(sample_steps=1, reference_steps=3), model, "cpu", verbose=False,
                    clock=lambda: clock[0])
    data = [(torch.randn(4, 3, 16, 16), torch.randint(10, (4,))) for _ in range(2)]
    prof.attach_reference(lambda m: _TinyEngine(m, clock, 3.0), lambda: iter(data))
    r0 = _epoch(prof, model, learner, opt, steps=8, clock=clock, cost=5.0)
    assert r0["step_time_s"] == 5.0 and r0["speedup"] == 1.0 and r0["reference_steps"] == 0
    assert r0["timed_steps"] == 5 and r0["profiled_steps"] == 1  # 8 - warm-up - footprint - 1 profiled
    drop_from_optimizer(opt, learner.set_boundary(2))
    # A twin of the run, stepped without any reference, to compare with after the epoch.
    twin, twin_learner, twin_opt = copy.deepcopy((model, learner, opt))
    grads = [p.requires_grad for p in model.parameters()]
    rng = torch.get_rng_state()
    r1 = _epoch(prof, model, learner, opt, steps=8, clock=clock, cost=2.0)
    assert r1["step_time_s"] == 2.0 and r1["step_time_ref_s"] == 3.0 and r1["speedup"] == 1.5
    assert r1["reference_steps"] == 3 and r1["profiler_overhead_s"] == 3 * 3.0 + 2 * 3.0  # + build's 2 steps
    assert torch.equal(rng, torch.get_rng_state())
    assert [p.requires_grad for p in model.parameters()] == grads
    # Weights, BN statistics (and num_batches_tracked) exactly those of the twin that had no reference.
    _epoch(Profiler(ProfilerConfig(), twin, "cpu", verbose=False), twin, twin_learner, twin_opt, steps=8)
    twin_state = twin.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, twin_state[k]), k
    s = prof.summary(end_to_end_s=100.0, last_row=r1)
    assert s["speedup"] == 1.5 and s["mean_speedup"] == pytest.approx(1.25)
    assert s["total_steps"] == 16 and s["steady_loop_s"] == 8 * 5.0 + 8 * 2.0
    assert s["projected_sgd_s"] == 8 * 5.0 + 8 * 3.0 and s["projected_speedup"] == 64.0 / 56.0
    assert s["profiler_overhead_s"] == r0["profiler_overhead_s"] + r1["profiler_overhead_s"]
    assert s["final_activation_reduction"] == r1["activation_reduction"]
    line = headline(s)
    assert line.startswith("end-to-end 100.0 s | speedup 1.50x vs all-SGD step | peak footprint ")
    prof.close()


# 16 steps: 0 warms up, 1 is measured, then whole periods of 4: steps 2..5 profiled, 6..13 timed.
@pytest.mark.parametrize("update_every,sync_every,timed", [(4, 1, 8), (1, 4, 8)])
def test_speedup_moves_with_the_cost_of_the_local_rule(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        update_every: int, sync_every: int, timed: int) -> None:
    """A full run (1 process) on a fake clock: every SGD step (run or reference, through the engine)
    costs 1, each local layer's delta costs ``D``, each sync's apply ``E``. The reported speedup must
    be exactly 1 / (1 + L*D/update_every + E/max(update_every, sync_every)) (a sync ends only a sync
    period that computed a delta: no delta, no all-reduce): a window that missed a period's delta
    or all-reduce would not give it."""
    from distlocal.config import compose
    from distlocal.local.rules import LocalRule
    from distlocal.parallel.ddp import DDPEngine
    from distlocal.profiler import timing
    from distlocal.trainer import train

    clock = [0.0]
    cost_d, cost_e = 0.125, 0.5
    monkeypatch.setattr(timing, "default_clock", lambda: clock[0])

    def wrap(fn, cost):  # noqa: ANN001, ANN202
        def inner(*a, **k):  # noqa: ANN002, ANN003, ANN202
            clock[0] += cost
            return fn(*a, **k)
        return inner

    monkeypatch.setattr(DDPEngine, "backward_step", wrap(DDPEngine.backward_step, 1.0))
    monkeypatch.setattr(LocalRule, "delta", wrap(LocalRule.delta, cost_d))
    monkeypatch.setattr(LocalLearner, "apply", wrap(LocalLearner.apply, cost_e))
    cfg = compose(["model=convnet", "data=digits", "mode=local", "trainer.epochs=2", "trainer.batch_size=16",
                   "trainer.max_steps_per_epoch=16", "schedule.warmup_epochs=1", "schedule.step=6",
                   f"local.update_every={update_every}", f"local.sync_every={sync_every}",
                   "profiler.sample_steps=1", "profiler.reference_steps=2", "wandb.mode=disabled",
                   "trainer.progress=false", "checkpoint.enabled=false"])
    summary = train(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    n_local = 6  # convnet: six conv stages, all local at boundary 6
    assert rows[1]["boundary"] == 6 and rows[1]["timed_steps"] == timed
    assert rows[1]["step_time_ref_s"] == 1.0
    expected = 1.0 / (1.0 + n_local * cost_d / update_every + cost_e / max(update_every, sync_every))
    assert rows[1]["speedup"] == pytest.approx(expected, rel=1e-12)
    assert rows[0]["speedup"] == 1.0 and rows[0]["step_time_s"] == 1.0
    # The run leads with its headline: summary.json and the last stdout line.
    doc = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert list(doc)[:len(HEADLINE_KEYS)] == list(HEADLINE_KEYS)
    assert doc["speedup"] == summary["speedup"] == rows[1]["speedup"]
    assert doc["footprint_bytes"] == rows[1]["footprint_bytes"] < doc["footprint_ref_bytes"]
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert last == doc["headline"] == with_time_to_accuracy(headline(doc), doc)  # distlocal/tta.py
    assert last.endswith(f"| {doc['tta_final_acc']:.2f} % test at {doc['time_to_final_acc_cpu_s']:.1f} s CPU "
                         f"(step {doc['time_to_final_acc_step']})")


def test_the_last_line_says_why_there_is_no_speedup() -> None:
    s = {"end_to_end_s": 2.0, "speedup": None}
    assert "| speedup ? (no local epoch, so no all-SGD reference was run" in headline(
        s, {"boundary": 0, "step_time_s": None})
    assert "| speedup ? (no step was timed: the epochs were too short" in headline(
        s, {"boundary": 2, "step_time_s": None})
    assert "| speedup ? (no all-SGD reference step was timed: profiler.reference_steps=0) |" in headline(
        s, {"boundary": 2, "step_time_s": 0.1, "step_time_ref_s": None})
    assert "| speedup 1.50x vs all-SGD step |" in headline({**s, "speedup": 1.5}, {"boundary": 2})


def test_disabled_profiler_is_inert() -> None:
    model = build_model("convnet", (3, 8, 8), 10)
    prof = Profiler(ProfilerConfig(enabled=False), model, "cpu")
    prof.attach_reference(lambda m: _TinyEngine(m), lambda: iter([]))
    prof.epoch_start(steps=4, boundary=1)
    prof.step_begin(1)
    with prof.phase("prefix"), prof.activations(), prof.footprint((model,)):
        model(torch.randn(2, 3, 8, 8)).sum()
    prof.step_end()
    assert prof.epoch_end(0) == {} and prof.summary(1.0) == {} and not prof.has_reference


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_cuda_step_peaks_snapshot_and_events(tmp_path: Path) -> None:
    dev = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    model = build_model("convnet", (3, 32, 32), 10).to(dev)
    learner = LocalLearner(model, make_rule("softhebb"))
    learner.lr = 1e-3
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    prof = Profiler(ProfilerConfig(sample_steps=2, memory_snapshot=True), model, dev, tmp_path, verbose=False)
    data = [(torch.randn(64, 3, 32, 32), torch.randint(10, (64,))) for _ in range(2)]
    prof.attach_reference(lambda m: _TinyEngine(m), lambda: iter(data))
    r0 = _epoch(prof, model, learner, opt, steps=8, shape=(64, 3, 32, 32))
    assert r0["cuda_step_peak_bytes"] > r0["footprint_param_bytes"]
    assert r0["cuda_max_reserved_bytes"] >= r0["cuda_max_allocated_bytes"] >= r0["cuda_step_peak_bytes"]
    assert isinstance(r0["nvml_used_bytes"], int) and r0["nvml_used_bytes"] > 0
    assert (tmp_path / "memory_snapshot_epoch0.pickle").stat().st_size > 0
    drop_from_optimizer(opt, learner.set_boundary(3))
    rng = torch.cuda.get_rng_state(dev)
    r1 = _epoch(prof, model, learner, opt, steps=8, shape=(64, 3, 32, 32))
    assert torch.equal(rng, torch.cuda.get_rng_state(dev))
    assert r1["activation_bytes_stage"][:3] == [0, 0, 0]
    assert r1["cuda_step_peak_ref_bytes"] > r1["cuda_step_peak_bytes"]
    assert r1["footprint_reduction"] > 1.0 and r1["step_time_s"] > 0 and r1["step_time_ref_s"] > 0
    print("cuda rows:", {k: r1[k] for k in ("footprint_bytes", "footprint_ref_bytes", "cuda_step_peak_bytes",
                                            "cuda_step_peak_ref_bytes", "step_time_s", "speedup")})


def _fake_run(d: Path, mode: str, times: list[float], bounds: list[int]) -> Path:
    d.mkdir()
    rows = []
    for e, (t, b) in enumerate(zip(times, bounds)):
        rows.append({"epoch": e, "test_acc": 50.0 + 10 * e, "epoch_time_s": t, "boundary": b,
                     "activation_bytes": 1000 - 100 * b, "speedup": times[0] / t,
                     "activation_reduction": 1000 / (1000 - 100 * b), "footprint_bytes": 5000 - 1000 * b,
                     "footprint_ref_bytes": 5000, "footprint_reduction": 5000 / (5000 - 1000 * b)})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "summary.json").write_text(json.dumps({
        "final_test_acc": rows[-1]["test_acc"], "best_test_acc": rows[-1]["test_acc"],
        "final_boundary": bounds[-1], "end_to_end_s": sum(times) + 1.0, "mode": mode, "rule": "softhebb"}))
    (d / "config.yaml").write_text(f"model: convnet\nmode: {mode}\nlocal:\n  rule: softhebb\n"
                                   "trainer:\n  epochs: 3\n")
    return d


def test_compare_tiny_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    compare = _load_script("compare")
    a = _fake_run(tmp_path / "run_local", "local", [4.0, 3.0, 2.0], [0, 1, 2])
    b = _fake_run(tmp_path / "run_sgd", "sgd", [4.0, 4.0, 4.0], [0, 0, 0])
    out = tmp_path / "plots"
    rows = compare.main([str(a), str(b), "--out", str(out)])
    for name in compare.PLOTS:
        assert (out / name).stat().st_size > 0, name
    text = capsys.readouterr().out
    assert "run_local" in text and "run_sgd" in text and "mean speedup" in text
    local = rows[0]
    assert local["final_boundary"] == 2 and local["rule"] == "softhebb" and rows[1]["rule"] == "-"
    assert local["act_reduction"] == pytest.approx(1000 / 800)
    assert local["footprint_reduction"] == pytest.approx(5000 / 3000)
    assert local["e2e_vs_sgd"] == pytest.approx(13.0 / 10.0)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
