"""engine=deepspeed on 2 gloo ranks (CPU): DDP equivalence, state carried across rebuilds, local weights.

The distributed checks run in ONE ``torchrun --nproc_per_node 2`` job (this file is also the
worker: ``python tests/test_deepspeed.py worker OUT``), so the processes start and import
DeepSpeed once; the job writes ``results.json`` and the tests below read it. A fifth test runs
the real ``deepspeed`` launcher on ``launch/train.py``. Every job has a wall-clock limit and its
process group is killed on expiry, so a hang fails instead of stalling the suite.

The first DeepSpeed start on a machine JIT-builds a shared-memory comm op (~60 s, cached in
``~/.cache/torch_extensions`` afterwards); the limits leave room for it.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
JOB_TIMEOUT_S = 420

pytestmark = [
    pytest.mark.dist,
    pytest.mark.timeout(JOB_TIMEOUT_S + 60),
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"),
]

# The trainer runs compared with DDP: tiny, deterministic, the boundary moving at epochs 1 and 2.
TRAIN_OVERRIDES = [
    "model=convnet_nobn", "data=digits", "mode=local", "trainer.epochs=3", "trainer.device=cpu",
    "trainer.deterministic=true", "trainer.max_steps_per_epoch=4", "trainer.progress=false",
    "schedule=static", "schedule.warmup_epochs=1", "schedule.every=1", "schedule.step=1",
    "wandb.mode=disabled",
    # These runs compare the weights through on_epoch_end; checkpoints and resume are covered by
    # the resume job (test_resume_is_bit_exact).
    "checkpoint.enabled=false",
]
ENGINES = {"ddp": ["engine=ddp"],
           **{f"zero{s}": ["engine=deepspeed", f"engine.zero_stage={s}"] for s in (0, 1, 2)}}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.pop("TORCH_EXTENSIONS_DIR", None)  # keep the JIT-built comm op cached between runs
    return env


def _run(cmd: list[str], cwd: Path, timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run a multi-process job; on timeout kill its whole process group and fail with its output."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:4])} … hung for {timeout:.0f} s; output tail:\n{out[-4000:]}")
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd[:4])} … exited {proc.returncode}; output tail:\n{out[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def _job(tmp_path_factory: pytest.TempPathFactory, command: str, result: str) -> dict[str, Any]:
    """Run this file's ``command`` as one 2-rank torchrun job; the JSON file ``result`` it writes."""
    out = tmp_path_factory.mktemp(f"deepspeed_{command}")
    _run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(Path(__file__)), command,
          str(out)], cwd=ROOT)
    return json.loads((out / result).read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _job(tmp_path_factory, "worker", "results.json")


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """ZeRO 0/1/2 runs interrupted and resumed with resume=auto, in one torchrun job."""
    return _job(tmp_path_factory, "resume", "resume.json")


# --------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("cut", ["epoch", "mid"])
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_resume_is_bit_exact(resumed: dict[str, Any], stage: int, cut: str) -> None:
    """Stopped after epoch 0 (or mid-epoch 1, from a `checkpoint.every_steps` file), `resume=auto`
    finishes with the uninterrupted run's weights, BN statistics and metrics, bit for bit."""
    r = resumed[f"zero{stage}"][cut]
    assert r["resumed_from"] == ({"epoch": 0, "mid_epoch": False} if cut == "epoch"
                                 else {"epoch": 1, "mid_epoch": True, "step_in_epoch": 2})
    assert r["boundaries"] == [0, 1]  # a rebuild after the load (epoch), before it (mid)
    assert r["weights_equal"], f"weights differ from the uninterrupted run: {r['diff']}"
    assert r["rows_equal"], r["rows"]


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_bn_statistics_follow_ddp_every_epoch(resumed: dict[str, Any], stage: int) -> None:
    """With BN in the suffix, rank 0's statistics are broadcast before each forward as DDP does: the
    test accuracy equals DDP's every epoch and the final statistics agree to float rounding."""
    r = resumed[f"zero{stage}"]["vs_ddp"]
    assert r["test_acc"][0] == r["test_acc"][1]
    assert r["bn_allclose"], f"BN statistics differ from DDP by {r['bn_max_abs']}"
    if stage == 0:  # not vacuous: without the broadcast the statistics do differ from DDP's
        assert r["bn_max_abs_without_broadcast"] > 1e3 * max(r["bn_max_abs"], 1e-7)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_trainer_matches_ddp(results: dict[str, Any], stage: int) -> None:
    """Same seed and data: engine=deepspeed (ZeRO `stage`) ends with DDP's weights, two boundary moves."""
    r = results["trainer"][f"zero{stage}"]
    assert r["boundaries"] == [0, 1, 2]
    assert r["rebuilds"] == 2 and all(ms > 0 for ms in r["rebuild_ms"])
    assert r["ranks_equal"], "the replicas differ"
    assert r["allclose_ddp"], \
        f"weights differ from DDP: max rel {r['max_rel_vs_ddp']}, max abs {r['max_abs_vs_ddp']}"
    assert r["grad_allreduce_bytes"] > 0


@pytest.mark.parametrize("case", ["sgd_zero0", "sgd_zero1", "sgd_zero2", "adamw_zero1", "adamw_zero2"])
def test_optimizer_state_survives_rebuild(results: dict[str, Any], case: str) -> None:
    """After a boundary move, a parameter that stays SGD makes the un-rebuilt optimizer's update."""
    r = results["momentum"][case]
    assert r["update_matches"], f"post-rebuild update differs: max abs {r['update_err']}"
    # Not vacuous: a reset momentum buffer would have given a clearly different update.
    assert r["reset_gap"] > 1e3 * max(r["update_err"], 1e-9)
    assert r["state_dict_matches"], "engine.state_dict() momentum differs from the reference optimizer's"
    assert r["reload_matches"], "a checkpoint loaded into another ZeRO stage continued differently"


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_bf16_state_and_masters_carried(results: dict[str, Any], stage: int) -> None:
    """bf16: a rebuild keeps each staying parameter's state and fp32 master bit for bit; the newly
    local parameters continue from their fp32 master, in fp32, and the next step leaves them alone."""
    r = results["bf16"][f"zero{stage}"]
    assert r["state_kept"] and r["masters_kept"]
    assert r["local_from_master"] and r["local_untouched"]


def test_local_param_exact_under_zero2(results: dict[str, Any]) -> None:
    """Under ZeRO 2 a local weight moves by exactly the rank-averaged Hebbian delta, on every rank."""
    r = results["hebbian"]
    assert r["steps"] >= 3
    assert r["exact"], f"local weights off by {r['max_err']}"
    assert r["moved"], "the Hebbian delta was zero: the check would be vacuous"
    assert r["ranks_equal"]
    assert r["not_in_optimizer"]


def test_deepspeed_launcher_cli(tmp_path: Path) -> None:
    """`deepspeed --num_gpus 2 launch/train.py engine=deepspeed …` finishes and writes the run directory."""
    run_dir = tmp_path / "run"
    _run([str(BIN / "deepspeed"), "--num_gpus", "2", "launch/train.py", "engine=deepspeed", "mode=local",
          "data=digits", "model=convnet", "trainer.epochs=3", "wandb.mode=disabled", "trainer.progress=false",
          f"hydra.run.dir={run_dir}"], cwd=ROOT)
    for name in ("config.yaml", "metrics.jsonl", "summary.csv", "checkpoints/last.pt"):
        assert (run_dir / name).is_file(), f"{name} missing"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    epochs = [r for r in rows if "epoch" in r and "test_acc" in r]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    assert all(r["grad_allreduce_bytes"] > 0 for r in epochs)


# --------------------------------------------------------------------------------------- worker
def _worker(out: Path) -> None:  # pragma: no cover - runs under torchrun
    import torch

    from distlocal.parallel.env import init_distributed

    env = init_distributed("cpu", "gloo", 300)
    torch.use_deterministic_algorithms(True, warn_only=True)
    results = {"trainer": _trainer_runs(out, env), "momentum": {}, "hebbian": _hebbian(env), "bf16": {}}
    for stage in (0, 1, 2):
        results["momentum"][f"sgd_zero{stage}"] = _momentum(env, stage, "sgd")
        results["bf16"][f"zero{stage}"] = _bf16_carry(env, stage)
    for stage in (1, 2):
        results["momentum"][f"adamw_zero{stage}"] = _momentum(env, stage, "adamw")
    if env.rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))


def _gather_equal(tensors: dict[str, Any], env) -> bool:  # noqa: ANN001
    """Whether every rank holds bitwise the same tensors."""
    import torch
    import torch.distributed as dist

    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors.values()])
    parts = [torch.empty_like(flat) for _ in range(env.world_size)]
    dist.all_gather(parts, flat)
    return all(torch.equal(parts[0], p) for p in parts[1:])


def _trainer_runs(out: Path, env) -> dict[str, Any]:  # noqa: ANN001
    import torch

    from distlocal.config import compose
    from distlocal.trainer import train

    final: dict[str, dict[str, Any]] = {}
    res: dict[str, Any] = {}
    for name, extra in ENGINES.items():
        seen: dict[str, Any] = {}

        def on_epoch_end(epoch: int, model, learner, engine, seen=seen) -> None:  # noqa: ANN001
            seen["w"] = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
            seen["rebuild_ms"] = list(engine.rebuild_ms)
            seen["bytes"] = engine.grad_allreduce_bytes

        summary = train(compose(TRAIN_OVERRIDES + extra), out / f"run_{name}", env=env,
                        on_epoch_end=on_epoch_end)
        final[name] = seen["w"]
        res[name] = {"boundaries": summary["boundary_per_epoch"], "rebuilds": len(seen["rebuild_ms"]),
                     "rebuild_ms": seen["rebuild_ms"], "ranks_equal": _gather_equal(seen["w"], env),
                     "grad_allreduce_bytes": seen["bytes"]}
    ref = final["ddp"]
    for name in ENGINES:
        w = final[name]
        res[name]["allclose_ddp"] = all(torch.allclose(w[k], ref[k], rtol=1e-4, atol=1e-6) for k in ref)
        res[name]["max_abs_vs_ddp"] = max(float((w[k] - ref[k]).abs().max()) for k in ref)
        res[name]["max_rel_vs_ddp"] = max(float(((w[k] - ref[k]).abs() / ref[k].abs().clamp_min(1e-6)).max())
                                          for k in ref)
    return res


def _batches(env, n_steps: int, per_rank: int = 4):  # noqa: ANN001
    """Every rank's batches for ``n_steps`` (same seed everywhere): ``[(xs, ys) per step]``."""
    import torch

    g = torch.Generator().manual_seed(1234)
    return [(torch.randn(env.world_size, per_rank, 1, 8, 8, generator=g),
             torch.randint(0, 10, (env.world_size, per_rank), generator=g)) for _ in range(n_steps)]


def _momentum(env, stage: int, optimizer: str = "sgd") -> dict[str, Any]:  # noqa: ANN001
    """ZeRO `stage`: 2 steps, move the boundary 0 -> 2, 1 step; compare with an un-rebuilt torch optimizer."""
    import torch
    import torch.nn.functional as F

    from distlocal.config import DeepSpeedEngineConfig, TrainerConfig
    from distlocal.models import build_model
    from distlocal.parallel.deepspeed import DeepSpeedEngine
    from distlocal.parallel.engine import build_optimizer, drop_from_optimizer

    torch.manual_seed(0)
    tc = TrainerConfig(lr=0.1 if optimizer == "sgd" else 1e-3, momentum=0.9, weight_decay=5e-4,
                       batch_size=4 * env.world_size, optimizer=optimizer)
    model = build_model("convnet_nobn", (1, 8, 8), 10)
    ref = copy.deepcopy(model)
    ref_opt = build_optimizer(list(ref.parameters()), tc)
    engine = DeepSpeedEngine(model, env, tc, DeepSpeedEngineConfig(zero_stage=stage))
    data = _batches(env, 4)

    def engine_step(xs, ys) -> None:  # noqa: ANN001
        x, y = xs[env.rank], ys[env.rank]
        with torch.no_grad():
            h = model.forward_range(x, 0, engine.boundary)
        engine.backward_step(F.cross_entropy(engine.forward(h).float(), y))

    def ref_step(m, opt, xs, ys) -> None:  # noqa: ANN001
        # The mean of the per-rank mean losses: the gradient the ranks' average reproduces.
        loss = sum(F.cross_entropy(m(xs[r]), ys[r]) for r in range(env.world_size)) / env.world_size
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for xs, ys in data[:2]:
        engine_step(xs, ys)
        ref_step(ref, ref_opt, xs, ys)
    # Move the boundary 0 -> 2 as the trainer does: freeze first, then rebuild.
    newly = [p for s in model.stages[:2] for p in s.parameters()]
    for p in newly:
        p.requires_grad_(False)
    engine.set_boundary(2, newly)
    ref_newly = [p for s in ref.stages[:2] for p in s.parameters()]
    for p in ref_newly:
        p.requires_grad_(False)
    drop_from_optimizer(ref_opt, ref_newly)
    # What a fresh (momentum-less) optimizer would do from here: the gap the test must see.
    reset = copy.deepcopy(ref)
    reset_opt = build_optimizer([p for p in reset.parameters() if p.requires_grad], tc)

    suffix = [n for n, p in model.named_parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in suffix}
    ref_before = {n: p.detach().clone() for n, p in ref.named_parameters() if n in suffix}
    xs, ys = data[2]
    engine_step(xs, ys)
    ref_step(ref, ref_opt, xs, ys)
    ref_step(reset, reset_opt, xs, ys)
    now, ref_now = dict(model.named_parameters()), dict(ref.named_parameters())
    reset_now = dict(reset.named_parameters())
    err = max(float(((now[n] - before[n]) - (ref_now[n] - ref_before[n])).abs().max()) for n in suffix)
    gap = max(float((reset_now[n] - ref_now[n]).abs().max()) for n in suffix)
    scale = max(float((ref_now[n] - ref_before[n]).abs().max()) for n in suffix)

    # Checkpoint: per-parameter state (a collective: every rank calls it) ...
    sd = engine.state_dict()
    ref_params = [p for g in ref_opt.param_groups for p in g["params"]]
    saved = sd["optimizer"]["state"]
    sd_ok = len(saved) == len(ref_params) and all(
        set(saved[i]) == set(ref_opt.state[p]) and all(
            torch.allclose(torch.as_tensor(saved[i][k]).float(), torch.as_tensor(v).float(),
                           rtol=1e-5, atol=1e-7)
            for k, v in ref_opt.state[p].items())
        for i, p in enumerate(ref_params))
    # ... loaded into an engine of another ZeRO stage continues as the original does. As on
    # resume, the weights are loaded after that engine was built, so its fp32 partitions are stale
    # until load_state_dict re-takes them.
    torch.manual_seed(1)
    model2 = build_model("convnet_nobn", (1, 8, 8), 10)
    newly2 = [p for s in model2.stages[:2] for p in s.parameters()]
    for p in newly2:
        p.requires_grad_(False)
    engine2 = DeepSpeedEngine(model2, env, tc, DeepSpeedEngineConfig(zero_stage=(stage + 1) % 3))
    engine2.set_boundary(2, newly2)
    model2.load_state_dict(model.state_dict())
    engine2.load_state_dict(sd)
    xs, ys = data[3]
    engine_step(xs, ys)
    x, y = xs[env.rank], ys[env.rank]
    with torch.no_grad():
        h = model2.forward_range(x, 0, 2)
    engine2.backward_step(F.cross_entropy(engine2.forward(h).float(), y))
    m2 = dict(model2.named_parameters())
    reload_ok = all(torch.allclose(m2[n], now[n], rtol=1e-5, atol=1e-7) for n in suffix)
    for e in (engine, engine2):
        e.close()
    return {"update_matches": err <= 1e-5 * max(scale, 1e-12) + 1e-7, "update_err": err, "reset_gap": gap,
            "state_dict_matches": sd_ok, "reload_matches": reload_ok}


def _bf16_carry(env, stage: int) -> dict[str, Any]:  # noqa: ANN001
    """bf16 + ZeRO `stage`: the per-parameter state and fp32 masters before and after a rebuild."""
    import torch
    import torch.nn.functional as F

    from distlocal.config import DeepSpeedEngineConfig, TrainerConfig
    from distlocal.models import build_model
    from distlocal.parallel.deepspeed import DeepSpeedEngine

    torch.manual_seed(0)
    tc = TrainerConfig(lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=4 * env.world_size,
                       precision="bf16")
    model = build_model("convnet_nobn", (1, 8, 8), 10)
    engine = DeepSpeedEngine(model, env, tc, DeepSpeedEngineConfig(zero_stage=stage))
    data = _batches(env, 3)

    def step(i: int) -> None:
        xs, ys = data[i]
        with torch.no_grad():
            h = model.forward_range(xs[env.rank], 0, engine.boundary)
        engine.backward_step(F.cross_entropy(engine.forward(h).float(), ys[env.rank]))

    step(0)
    step(1)
    before = engine.state_dict()
    newly = [p for s in model.stages[:2] for p in s.parameters()]
    for p in newly:
        p.requires_grad_(False)
    engine.set_boundary(2, newly)
    after = engine.state_dict()
    n = len(newly)  # the suffix's parameters are indexed in stage order: the newly local come first
    st0, st1 = before["optimizer"]["state"], after["optimizer"]["state"]
    state_kept = len(st1) == len(st0) - n and all(
        torch.equal(st1[i]["momentum_buffer"], st0[i + n]["momentum_buffer"]) for i in st1)
    m0, m1 = before["fp32_master"], after["fp32_master"]
    masters_kept = len(m1) == len(m0) - n and all(torch.equal(m1[i], m0[i + n]) for i in m1)
    local_from_master = all(p.dtype == torch.float32 and torch.equal(p.detach(), m0[i])
                            for i, p in enumerate(newly))
    frozen = [p.detach().clone() for p in newly]
    step(2)
    local_untouched = all(torch.equal(p.detach(), f) for p, f in zip(newly, frozen))
    engine.close()
    return {"state_kept": state_kept, "masters_kept": masters_kept, "local_from_master": local_from_master,
            "local_untouched": local_untouched}


def _hebbian(env) -> dict[str, Any]:  # noqa: ANN001
    """ZeRO 2: after stages 0-1 turn local, each step moves their weights by exactly the mean delta."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn

    from distlocal.config import DeepSpeedEngineConfig, TrainerConfig
    from distlocal.local.learner import LocalLearner
    from distlocal.local.rules import make_rule
    from distlocal.models import build_model
    from distlocal.parallel.deepspeed import DeepSpeedEngine
    from distlocal.parallel.sync import DeltaSync

    torch.manual_seed(0)
    tc = TrainerConfig(lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=4 * env.world_size)
    model = build_model("convnet_nobn", (1, 8, 8), 10)
    learner = LocalLearner(model, make_rule("softhebb"))
    sync = DeltaSync(learner, env)
    engine = DeepSpeedEngine(model, env, tc, DeepSpeedEngineConfig(zero_stage=2))
    data = _batches(env, 5)

    def step(i: int) -> torch.Tensor:
        xs, ys = data[i]
        h = learner.prefix_forward(xs[env.rank], i)
        loss = F.cross_entropy(engine.forward(h).float(), ys[env.rank])
        engine.backward_step(loss)
        return loss

    step(0)  # one all-SGD step: every weight has been through ZeRO's flat buffers and momentum
    newly = learner.set_boundary(2)
    engine.set_boundary(2, newly)
    learner.lr = 0.05
    # The flat buffer's layout: per local Conv2d/Linear, weight then bias (LocalLearner's order).
    local_mods = [m for s in model.stages[:2] for m in s.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    params = [t for m in local_mods for t in (m.weight, m.bias) if t is not None]
    exact, moved, max_err = True, False, 0.0
    for i in range(1, 5):
        before = [p.detach().clone() for p in params]
        step(i)
        mine = learner.buffer.clone()
        parts = [torch.empty_like(mine) for _ in range(env.world_size)]
        dist.all_gather(parts, mine)
        avg = parts[0].clone()
        for p in parts[1:]:
            avg += p
        avg.div_(env.world_size)  # DeltaSync: all-reduce SUM, then divide
        sync.start()
        sync.finish()
        off = 0
        for p, b in zip(params, before):
            expected = b + avg[off: off + p.numel()].view_as(p)
            off += p.numel()
            exact &= torch.equal(p.detach(), expected)
            moved |= not torch.equal(p.detach(), b)
            max_err = max(max_err, float((p.detach() - expected).abs().max()))
    in_opt = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
    not_in_opt = all(id(p) not in in_opt and getattr(p, "_hp_mapping", None) is None for p in params)
    ranks_equal = _gather_equal({str(i): p for i, p in enumerate(params)}, env)
    engine.close()
    return {"steps": 4, "exact": exact, "moved": moved, "max_err": max_err, "ranks_equal": ranks_equal,
            "not_in_optimizer": not_in_opt}


class _Interrupt(Exception):
    """Raised by a hook on every rank at the same point: the run stops as if killed there."""


# Rows' keys that two runs must agree on (the rest are wall-clock and memory readings).
_ROW_KEYS = ("epoch", "train_loss", "test_loss", "test_acc", "boundary", "lr", "local_lr", "skipped_updates",
             "u")


def _resume_worker(out: Path) -> None:  # pragma: no cover - runs under torchrun
    """Per ZeRO stage: an uninterrupted run, one stopped after epoch 0 (boundary 0: the resumed run
    loads the engine state, then rebuilds at boundary 1) and one stopped mid-epoch 1 (after the
    step-6 checkpoint, boundary 1: the engine is rebuilt first, then loaded), each finished by a
    second ``train`` with ``resume=auto``; and a DDP run of the same config, for the BN statistics."""
    import torch

    from distlocal import checkpoint
    from distlocal.config import compose
    from distlocal.parallel.env import init_distributed
    from distlocal.trainer import train

    env = init_distributed("cpu", "gloo", 300)
    base = ["model=convnet", "data=digits", "mode=local", "trainer.epochs=2", "trainer.device=cpu",
            "trainer.deterministic=true", "trainer.max_steps_per_epoch=4", "trainer.batch_size=32",
            "trainer.progress=false", "schedule.warmup_epochs=1", "wandb.mode=disabled",
            "profiler.enabled=false", "checkpoint.every_steps=6", "resume=auto", "engine=deepspeed"]

    def stop_after_epoch_0(epoch: int, *_: Any) -> None:
        if epoch == 0:
            raise _Interrupt

    def stop_mid_epoch_1(epoch: int, step: int) -> None:
        if (epoch, step) == (1, 1):  # global step 6: the step checkpoint was just written
            raise _Interrupt

    def rows(run: Path) -> list[dict[str, Any]]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [{k: json.loads(line).get(k) for k in _ROW_KEYS} for line in lines]

    def final(run: Path) -> dict[str, torch.Tensor]:
        return checkpoint.load(run / "checkpoints" / "last.pt")["model"]

    ddp = out / "ddp"
    train(compose([*base[:-1], "engine=ddp"]), ddp, env=env)
    results: dict[str, Any] = {}
    for stage in (0, 1, 2):
        cfg = compose([*base, f"engine.zero_stage={stage}"])
        full = out / f"zero{stage}_full"
        train(cfg, full, env=env)
        res: dict[str, Any] = {}
        if env.is_main:
            a, b = final(ddp), final(full)
            bufs = [k for k in a if "running_" in k]
            res["vs_ddp"] = {
                "test_acc": [[r["test_acc"] for r in rows(x)] for x in (ddp, full)],
                "bn_max_abs": max(float((a[k] - b[k]).abs().max()) for k in bufs),
                "bn_allclose": all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in bufs)}
        if stage == 0:  # the same run without the broadcast: what the check above would miss
            from distlocal.parallel.deepspeed import DeepSpeedEngine

            keep = DeepSpeedEngine._broadcast_buffers
            DeepSpeedEngine._broadcast_buffers = lambda self: None
            try:
                train(cfg, out / "zero0_no_broadcast", env=env)
            finally:
                DeepSpeedEngine._broadcast_buffers = keep
            if env.is_main:
                a, b = final(ddp), final(out / "zero0_no_broadcast")
                res["vs_ddp"]["bn_max_abs_without_broadcast"] = max(
                    float((a[k] - b[k]).abs().max()) for k in a if "running_" in k)
                res["vs_ddp"]["test_acc_without_broadcast"] = [
                    r["test_acc"] for r in rows(out / "zero0_no_broadcast")]
        for cut, hooks in (("epoch", {"on_epoch_end": stop_after_epoch_0}),
                           ("mid", {"on_step_end": stop_mid_epoch_1})):
            run = out / f"zero{stage}_{cut}"
            try:
                train(cfg, run, env=env, **hooks)
            except _Interrupt:
                pass
            saved = checkpoint.load(run / "checkpoints" / "last.pt") if env.is_main else {}
            summary = train(cfg, run, env=env)
            if not env.is_main:
                continue
            keys = ("epoch", "mid_epoch", "step_in_epoch") if saved["mid_epoch"] else ("epoch", "mid_epoch")
            a, b = final(full), final(run)
            diff = {k: float((a[k].double() - b[k].double()).abs().max())
                    for k in a if not torch.equal(a[k], b[k])}
            res[cut] = {"resumed_from": {k: saved[k] for k in keys},
                        "boundaries": summary["boundary_per_epoch"],
                        "weights_equal": a.keys() == b.keys() and not diff, "diff": diff,
                        "rows_equal": rows(full) == rows(run), "rows": [rows(full), rows(run)]}
        results[f"zero{stage}"] = res
    if env.is_main:
        (out / "resume.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":  # pragma: no cover - the torchrun worker
    if len(sys.argv) != 3 or sys.argv[1] not in ("worker", "resume"):
        sys.exit("usage: torchrun --nproc_per_node 2 tests/test_deepspeed.py worker|resume OUT_DIR")
    sys.path.insert(0, str(ROOT))
    (_worker if sys.argv[1] == "worker" else _resume_worker)(Path(sys.argv[2]))
