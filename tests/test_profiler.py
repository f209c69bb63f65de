"""The profiler: exact activation bytes, device-memory fields without a GPU, side-effect-free
calibration, and the bench/compare scripts on tiny inputs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from distlocal.config import ProfilerConfig
from distlocal.local.learner import LocalLearner
from distlocal.local.rules import make_rule
from distlocal.models import StagedModel, build_model
from distlocal.profiler import (
    ActivationCounter,
    Profiler,
    device_memory,
    nvml_used_bytes,
    saved_activation_bytes,
    train_step,
)

REPO = Path(__file__).resolve().parent.parent
B, D, H, C = 5, 7, 11, 3  # batch, input, hidden, classes: distinct primes so a wrong term shows
F32, I64 = 4, 8


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
    if boundary:
        learner.set_boundary(boundary)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(B, D), torch.randint(C, (B,))
    counter = ActivationCounter(model.stages)
    train_step(model, learner, opt, x, y, counter=counter)
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
    full = ActivationCounter(model.stages)
    train_step(model, learner, torch.optim.SGD(model.parameters(), lr=0.0), x, y, counter=full)
    learner.set_boundary(3)
    split = ActivationCounter(model.stages)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    train_step(model, learner, opt, x, y, counter=split)
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


def _epoch(prof: Profiler, model: StagedModel, learner: LocalLearner, opt: torch.optim.Optimizer,
           steps: int = 4, shape: tuple[int, ...] = (4, 3, 16, 16)) -> dict:
    """One profiled 'epoch' the way the trainer drives it (see the integration in trainer.py)."""
    prof.epoch_start(opt)
    dev = next(model.parameters()).device
    x, y = torch.randn(shape, device=dev), torch.randint(10, (shape[0],), device=dev)
    for step in range(steps):
        prof.step_begin(step)
        with prof.phase("data"):
            xs, ys = x.clone(), y.clone()
        with prof.activations():
            with prof.phase("prefix"):
                h = learner.prefix_forward(xs, step)
            with prof.phase("suffix_fwd"):
                out = model.forward_range(h, learner.boundary, model.num_stages)
                loss = nn.functional.cross_entropy(out, ys)
        with prof.phase("backward"):
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with prof.phase("sync"):
            learner.pack_stats()
            learner.apply()
        prof.step_end()
    return prof.epoch_end(learner.boundary, opt)


def test_profiler_epochs_reference_and_summary() -> None:
    torch.manual_seed(0)
    model = build_model("convnet", (3, 16, 16), 10)
    learner = LocalLearner(model, make_rule("softhebb"))
    learner.lr = 1e-3
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    prof = Profiler(ProfilerConfig(sample_steps=2), model, "cpu", verbose=False)
    assert [prof.should_sample(s) for s in range(4)] == [False, True, True, False]
    r0 = _epoch(prof, model, learner, opt)
    assert r0["profiled_steps"] == 2
    assert r0["activation_bytes_ref"] == r0["activation_bytes"] > 0
    assert r0["memory_reduction"] == 1.0
    assert r0["speedup"] == pytest.approx(1.0)
    for name in ("data", "prefix", "suffix_fwd", "backward", "optimizer", "sync"):
        assert r0[f"phase_{name}_s"] >= 0.0
    assert r0["param_bytes"] == sum(p.numel() * 4 for p in model.parameters())
    assert r0["grad_bytes"] == r0["param_bytes"] and r0["optim_state_bytes"] == r0["param_bytes"]
    with prof.phase("rebuild"):  # epoch-level phase, before epoch_start: belongs to the next epoch
        newly = learner.set_boundary(3)
    from distlocal.dist.engine import drop_from_optimizer
    drop_from_optimizer(opt, newly)
    r1 = _epoch(prof, model, learner, opt)
    assert r1["phase_rebuild_s"] > 0.0
    assert r1["activation_bytes_stage"][:3] == [0, 0, 0]
    assert r1["memory_reduction"] > 1.0
    assert r1["speedup"] is not None and r1["step_time_ref_s"] == r0["step_time_ref_s"]
    assert r1["optim_state_bytes"] < r0["optim_state_bytes"]
    assert r1["device_memory_reduction"] is None and r1["cuda_max_allocated_bytes"] is None
    s = prof.summary(end_to_end_s=10.0)
    assert s["reference"] == "warmup" and s["total_steps"] == 8
    assert s["projected_sgd_s"] == pytest.approx(r0["step_time_ref_s"] * 8)
    assert s["steady_loop_s"] == pytest.approx(4 * r0["step_time_s"] + 4 * r1["step_time_s"])
    assert s["projected_speedup"] == pytest.approx(s["projected_sgd_s"] / s["steady_loop_s"])
    assert s["projected_sgd_end_to_end_s"] == pytest.approx(10.0 - s["steady_loop_s"] + s["projected_sgd_s"])
    assert s["projected_speedup"] > 0 and s["final_memory_reduction"] == r1["memory_reduction"]
    prof.close()


def test_calibrate_leaves_model_untouched() -> None:
    torch.manual_seed(0)
    model = build_model("convnet", (3, 16, 16), 10)
    learner = LocalLearner(model, make_rule("freeze"))  # a freeze run without warm-up: local from step 0
    learner.set_boundary(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.requires_grad for p in model.parameters()]
    rng = torch.get_rng_state()
    prof = Profiler(ProfilerConfig(calibration_steps=2), model, "cpu", verbose=False)
    assert not prof.has_reference
    out = prof.calibrate((4, 3, 16, 16), 10)
    assert prof.has_reference
    assert out["calib_step_time_s"] > 0 and out["calib_activation_bytes"] > 0
    after = model.state_dict()
    for k, v in before.items():  # weights and BN running stats (and num_batches_tracked)
        assert torch.equal(v, after[k]), k
    assert [p.requires_grad for p in model.parameters()] == grads
    assert torch.equal(rng, torch.get_rng_state())
    # The calibrated reference feeds a local epoch's ratios.
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    row = _epoch(prof, model, learner, opt, steps=2)
    assert row["activation_bytes_ref"] == out["calib_activation_bytes"]
    assert row["memory_reduction"] > 1.0 and row["speedup"] is not None


def test_disabled_profiler_is_inert() -> None:
    model = build_model("convnet", (3, 8, 8), 10)
    prof = Profiler(ProfilerConfig(enabled=False), model, "cpu")
    prof.epoch_start()
    prof.step_begin(1)
    with prof.phase("prefix"), prof.activations():
        model(torch.randn(2, 3, 8, 8)).sum()
    prof.step_end()
    assert prof.epoch_end(0) == {} and prof.summary(1.0) == {} and prof.calibrate((2, 3, 8, 8), 10) == {}


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_cuda_memory_fields_snapshot_and_calibration(tmp_path: Path) -> None:
    dev = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    model = build_model("convnet", (3, 32, 32), 10).to(dev)
    learner = LocalLearner(model, make_rule("softhebb"))
    learner.lr = 1e-3
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    prof = Profiler(ProfilerConfig(sample_steps=2, memory_snapshot=True), model, dev, tmp_path, verbose=False)
    r0 = _epoch(prof, model, learner, opt, shape=(64, 3, 32, 32))
    assert r0["cuda_max_allocated_bytes"] > 0
    assert r0["cuda_max_reserved_bytes"] >= r0["cuda_max_allocated_bytes"]
    assert isinstance(r0["nvml_used_bytes"], int) and r0["nvml_used_bytes"] > 0
    assert r0["device_memory_reduction"] == 1.0
    assert (tmp_path / "memory_snapshot_epoch0.pickle").stat().st_size > 0
    from distlocal.dist.engine import drop_from_optimizer
    drop_from_optimizer(opt, learner.set_boundary(3))
    r1 = _epoch(prof, model, learner, opt, shape=(64, 3, 32, 32))
    assert r1["activation_bytes_stage"][:3] == [0, 0, 0]
    assert r1["memory_reduction"] > 1.0 and r1["device_memory_reduction"] > 1.0
    print("cuda rows:", {k: r0[k] for k in ("activation_bytes", "cuda_max_allocated_bytes", "step_time_s")},
          {k: r1[k] for k in ("activation_bytes", "cuda_max_allocated_bytes", "step_time_s", "speedup",
                               "device_memory_reduction")})
    # Calibration on CUDA: weights, BN statistics and the CUDA RNG untouched; a peak measured.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.cuda.get_rng_state(dev)
    fresh = Profiler(ProfilerConfig(calibration_steps=2), model, dev, verbose=False)
    out = fresh.calibrate((64, 3, 32, 32), 10)
    assert out["calib_peak_bytes"] > 0 and out["calib_activation_bytes"] == r0["activation_bytes"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert torch.equal(rng, torch.cuda.get_rng_state(dev))


def _fake_run(d: Path, mode: str, times: list[float], bounds: list[int]) -> Path:
    d.mkdir()
    rows = []
    for e, (t, b) in enumerate(zip(times, bounds)):
        rows.append({"epoch": e, "test_acc": 50.0 + 10 * e, "epoch_time_s": t, "boundary": b,
                     "activation_bytes": 1000 - 100 * b, "speedup": times[0] / t,
                     "memory_reduction": 1000 / (1000 - 100 * b)})
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
    assert local["act_mem_reduction"] == pytest.approx(1000 / 800)
    assert local["e2e_vs_sgd"] == pytest.approx(13.0 / 10.0)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
