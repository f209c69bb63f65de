"""The training loop: one LoCal+SGD step readable top to bottom.

A step is (DESIGN §3)::

    h = learner.prefix_forward(x)   # local stages, no autograd; hooks accumulate lr * delta
    out = engine.forward(h)         # SGD suffix (DDP-wrapped)
    engine.backward_step(loss)      # gradients + all-reduce of the suffix only
    sync.start(); sync.finish()     # one all-reduce of deltas, BN stats and loss; apply

The boundary moves (never back) at epoch starts, decided by the schedule.
"""

from __future__ import annotations

import math
import os
import random
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig
from tqdm import tqdm

from distlocal import checkpoint, validation
from distlocal.config import to_yaml
from distlocal.data import build_datasets, build_eval_loader, build_loaders
from distlocal.dist.ddp import build_engine
from distlocal.dist.engine import Engine
from distlocal.dist.env import DistEnv, all_reduce_sum, broadcast_object, init_distributed
from distlocal.dist.sync import DeltaSync, average_buffers
from distlocal.local.autofreeze import AutoFreeze
from distlocal.local.learner import LocalLearner
from distlocal.local.rules import make_rule
from distlocal.local.schedule import DynamicSelector, build_schedule, relative_update, stage_weights
from distlocal.local.supervision import WeakSupervision
from distlocal.metrics import MetricsLogger
from distlocal.models import StagedModel, build_model
from distlocal.profiler import Profiler, headline


def seed_everything(seed: int, deterministic: bool) -> None:
    """Same seed on every rank, so every replica starts from identical weights."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def lr_lambda(cfg, steps_per_epoch: int):
    """Per-step LR multiplier: linear warm-up, then cosine, step or constant."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(cfg.lr_warmup_epochs * steps_per_epoch)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
        if cfg.lr_schedule == "step":
            return cfg.lr_gamma ** (step // max(1, cfg.lr_step_epochs * steps_per_epoch))
        return 1.0

    return f


def validate(cfg: DictConfig, world_size: int | None = None) -> None:
    """Every knob's range, type and choice, and the rules between knobs (``distlocal.validation``);
    one clear line per failure. The entry point runs the same pass before Hydra writes anything."""
    validation.validate(cfg, world_size)


# local.lr above which a rule lost accuracy in our measurements (docs/local-rules.md).
SAFE_LOCAL_LR = {"hebb": 1e-4, "oja": 1e-4, "softhebb": 5e-3}


def _warn_unsafe_lr(cfg: DictConfig) -> None:
    limit = SAFE_LOCAL_LR.get(cfg.local.rule)
    if cfg.mode == "local" and limit is not None and cfg.local.lr > limit:
        warnings.warn(f"distlocal: local.lr={cfg.local.lr} is above the measured safe range for "
                      f"'{cfg.local.rule}' (<= {limit}); see docs/local-rules.md", stacklevel=2)


def _autocast(env: DistEnv, precision: str):
    dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision)
    return torch.autocast(env.device.type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, env: DistEnv, precision: str) -> tuple[float, float]:
    """Test loss and top-1 accuracy (%) over the whole test set, summed across ranks."""
    model.eval()
    loss_sum = correct = n = 0.0
    for x, y in loader:
        x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
        with _autocast(env, precision):
            out = model(x)
        loss_sum += float(F.cross_entropy(out.float(), y, reduction="sum"))
        correct += float((out.argmax(1) == y).sum())
        n += y.numel()
    model.train()
    loss_sum, correct, n = all_reduce_sum([loss_sum, correct, n], env)
    return loss_sum / max(n, 1), 100.0 * correct / max(n, 1)


EpochHook = Callable[[int, StagedModel, LocalLearner, Engine], None]
StepHook = Callable[[int, int], None]


class TrainingDiverged(RuntimeError):
    """Too many non-finite local updates in a row; a checkpoint was saved before stopping."""


def _rng_state() -> dict[str, Any]:
    # Plain values and tensors only, so the checkpoint loads with weights_only=True.
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()),
                                                   *np_state[2:]), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather_sums(sums: list[float], env: DistEnv) -> list[list[float]]:
    """Every rank's ``[loss_sum, n_seen]`` of the epoch in progress, by rank (mid-epoch checkpoints).

    Each rank sums its own shard until the epoch-end all-reduce; a checkpoint that kept rank 0's
    alone would make every resumed rank start from rank 0's sums (the epoch's train loss wrong).
    """
    t = torch.tensor(sums, dtype=torch.float64)
    if not env.distributed:
        return [t.tolist()]
    if dist.get_backend() == "nccl":
        t = t.to(env.device)
    parts = [torch.empty_like(t) for _ in range(env.world_size)]
    dist.all_gather(parts, t)
    return [p.cpu().tolist() for p in parts]


def _own_sums(saved: list, saved_world: int, env: DistEnv) -> list[float]:
    """This rank's share of the saved per-rank sums: its own on the same world size (exact);
    otherwise rank 0 carries the total and the others start at zero (the same epoch mean)."""
    if saved and not isinstance(saved[0], (list, tuple)):  # a checkpoint from before per-rank sums
        saved = [list(saved)]
    if saved_world == env.world_size and len(saved) == env.world_size:
        return list(saved[env.rank])
    total = [sum(s[0] for s in saved), sum(s[1] for s in saved)]
    return total if env.is_main else [0.0, 0.0]


def train(
    cfg: DictConfig,
    run_dir: Path,
    env: DistEnv | None = None,
    on_epoch_end: EpochHook | None = None,
    on_step_end: StepHook | None = None,
) -> dict[str, Any]:
    """Train as ``cfg`` says, writing the run directory from rank 0; returns the run summary.

    ``on_epoch_end(epoch, model, learner, engine)`` runs on every rank after each epoch's
    checkpoint and metrics; ``on_step_end(epoch, step)`` after every step (tests use them to
    compare replicas and to inject faults).
    """
    # Before anything is built: without an env, init_distributed reads the same WORLD_SIZE.
    validate(cfg, None if env is None else env.world_size)
    _warn_unsafe_lr(cfg)
    t_start = time.perf_counter()
    env = env or init_distributed(cfg.trainer.device, cfg.engine.backend, cfg.engine.timeout_s)
    tc = cfg.trainer
    seed_everything(tc.seed, tc.deterministic)
    resume = checkpoint.find_resume(cfg.resume, run_dir)  # every rank reads the same file

    # ---- data, model, local learning machinery -------------------------------------------
    bundle = build_datasets(cfg.data)
    train_loader, test_loader, sampler = build_loaders(
        bundle, tc.batch_size // env.world_size, env.rank, env.world_size, tc.seed, cfg.data.num_workers)
    val_loader = None if bundle.val is None else build_eval_loader(
        bundle.val, tc.batch_size // env.world_size, env.rank, env.world_size, cfg.data.num_workers)
    model = build_model(cfg.model, bundle.in_shape, bundle.num_classes).to(env.device)
    model.train()
    rule = make_rule("freeze" if cfg.mode == "freeze" else cfg.local.rule, temperature=cfg.local.temperature)
    schedule = None if cfg.mode == "sgd" else build_schedule(cfg.schedule, model.num_stages, tc.epochs)
    # One process syncing every step has nothing to average or accumulate: no delta buffer.
    learner = LocalLearner(model, rule, cfg.local.update_every, cfg.local.sample_fraction,
                           cfg.local.chunk_size, cfg.local.chunk_bytes,
                           direct=env.world_size == 1 and cfg.local.sync_every == 1)
    learner.auto_freeze = AutoFreeze.from_config(cfg.local.auto_freeze)
    sync = DeltaSync(learner, env, cfg.local.sync_every, cfg.local.sync_async, cfg.local.sync_dtype)
    ws = WeakSupervision.from_config(cfg.local.weak_supervision)
    engine = build_engine(cfg.engine, model, env, tc)
    steps_per_epoch = len(train_loader) if tc.max_steps_per_epoch is None else min(
        len(train_loader), tc.max_steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(engine.optimizer, lr_lambda(tc, steps_per_epoch))
    prof = Profiler(cfg.profiler, model, env.device, run_dir, verbose=env.is_main)  # docs/profiling.md
    # The all-SGD reference: a boundary-0 copy behind the run's own engine, optimizer, precision
    # and loader, a few steps per epoch between the run's (built at the first local epoch).
    prof.attach_reference(lambda m: build_engine(cfg.engine, m, env, tc), lambda: iter(train_loader),
                          autocast=lambda: _autocast(env, tc.precision))

    # ---- resume: the LoCal state first (boundary, hooks, engine), then the values --------
    start_epoch, start_step, global_step = 0, 0, 0
    best_acc, acc, boundaries = 0.0, 0.0, []
    epoch_sums = [0.0, 0.0]  # loss_sum, n_seen of the epoch in progress (mid-epoch resume)
    transition: dict[str, torch.Tensor] = {}
    if resume is not None:
        path, st = resume
        if st["boundary"] > 0:
            engine.set_boundary(st["boundary"], learner.set_boundary(st["boundary"]))
        # After the rebuild: under bf16/fp16 DeepSpeed re-casts newly local weights from its masters.
        model.load_state_dict(st["model"])
        learner.load_state_dict(st["learner"])
        engine.load_state_dict(st["engine"])
        scheduler.load_state_dict(st["scheduler"])
        ws.load_state_dict(st["weak_supervision"])
        if schedule is not None and st["schedule"] is not None:
            schedule.load_state_dict(st["schedule"])
        best_acc, acc, boundaries = st["best_acc"], st["acc"], list(st["boundaries"])
        global_step = st["global_step"]
        if st["mid_epoch"]:
            start_epoch, start_step = st["epoch"], st["step_in_epoch"]
            epoch_sums = _own_sums(st["epoch_sums"], st["world_size"], env)
            boundaries = boundaries[:-1]  # the epoch in progress re-records its boundary
        else:
            start_epoch = st["epoch"] + 1
        if env.is_main:
            print(f"distlocal: resuming from {path} at epoch {start_epoch} step {start_step} "
                  f"(saved by world size {st['world_size']}, now {env.world_size})")

    def save_checkpoint(epoch: int, step_in_epoch: int, mid_epoch: bool) -> None:
        if not cfg.checkpoint.enabled:
            return
        engine_state = engine.state_dict()  # a collective under DeepSpeed ZeRO 1/2: every rank
        sums = _gather_sums(epoch_sums, env) if mid_epoch else [list(epoch_sums)]  # a collective too
        error = None
        if env.is_main:
            try:
                checkpoint.save(run_dir / "checkpoints", {
                    "model": model.state_dict(), "epoch": epoch, "step_in_epoch": step_in_epoch,
                    "mid_epoch": mid_epoch, "global_step": global_step, "epoch_sums": sums,
                    "boundary": learner.boundary, "boundaries": list(boundaries),
                    "learner": learner.state_dict(),
                    "engine": engine_state, "scheduler": scheduler.state_dict(),
                    "weak_supervision": ws.state_dict(),
                    "schedule": schedule.state_dict() if schedule is not None else None,
                    "best_acc": best_acc, "acc": acc, "world_size": env.world_size, "rng": _rng_state(),
                    "transition": transition if mid_epoch else None,
                }, keep=cfg.checkpoint.keep)
            except checkpoint.CheckpointError as exc:  # disk full, I/O error: last.pt is the previous one
                error = str(exc)
        # Every rank learns the outcome, so a failed write stops them all with rank 0's one line
        # instead of leaving the others waiting in the next collective until the timeout.
        if env.distributed:
            error = broadcast_object(error, env)
        if error is not None:
            raise checkpoint.CheckpointError(error)

    # ---- run directory: rank 0 alone writes it ---------------------------------------------
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    tags = [f"mode:{cfg.mode}", f"rule:{rule.name}", f"model:{cfg.model}", f"data:{cfg.data.name}",
            f"engine:{cfg.engine.name}", f"world:{env.world_size}"]
    logger = MetricsLogger(run_dir, cfg, enabled=env.is_main, tags=tags,
                           keep_epochs_below=start_epoch if resume is not None else 0)
    if env.is_main:
        print(f"distlocal: run dir {run_dir.resolve()} | model {cfg.model} ({model.num_stages} stages) | "
              f"mode {cfg.mode} | data {cfg.data.name} | world {env.world_size} | device {env.device}")

    row: dict[str, Any] | None = None  # the last epoch's row: the summary's headline
    for epoch in range(start_epoch, tc.epochs):
        # ---- move the boundary (epoch start, never back) ------------------------------------
        n_rebuilds = len(engine.rebuild_ms)
        target = 0 if schedule is None else schedule.boundary(epoch)
        if target > learner.boundary:
            with prof.phase("rebuild"):
                newly = learner.set_boundary(target)
                engine.set_boundary(target, newly)
            ws.reset_reference()
        # The transition stage's weights at epoch start, for the selector's u (saved mid-epoch).
        transition = stage_weights(model.stages[learner.boundary])
        if resume is not None and epoch == start_epoch and resume[1]["mid_epoch"]:
            transition = resume[1]["transition"]
        boundaries.append(learner.boundary)

        sampler.set_epoch(epoch)
        sync.reset_counters()
        engine.grad_allreduce_bytes = engine.grad_allreduce_steps = 0
        first = start_step if epoch == start_epoch else 0
        if first == 0:
            epoch_sums = [0.0, 0.0]
        # Timed windows hold whole lever periods: one delta per update_every, one sync per sync_every.
        period = math.lcm(cfg.local.update_every, cfg.local.sync_every) if learner.has_local else 1
        prof.epoch_start(engine.optimizer, steps=steps_per_epoch, boundary=learner.boundary, first=first,
                         period=period, sync_every=cfg.local.sync_every if learner.has_local else 1)
        t0 = time.perf_counter()
        bar = tqdm(total=steps_per_epoch, initial=first, desc=f"epoch {epoch}", leave=False, mininterval=1.0,
                   disable=not (env.is_main and tc.progress))
        # Resume restores the RNG where the uninterrupted run had it: at an epoch end that is
        # before the loader's iterator draws its seed; mid-epoch, after the batches already done
        # (the sampler's order is a function of (seed, epoch) alone, so skipping them is exact).
        resuming_here = resume is not None and epoch == start_epoch
        if resuming_here and first == 0:
            _set_rng_state(resume[1]["rng"])
        batches = iter(train_loader)
        for _ in range(first):
            next(batches)
        if resuming_here and first > 0:
            _set_rng_state(resume[1]["rng"])
        for step in range(first, steps_per_epoch):
            prof.step_begin(step)                             # times a few steps, phase by phase
            with prof.phase("data"):
                x, y = next(batches)
                x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            learner.lr = cfg.local.lr * ws.multiplier
            # One step per epoch (the second) is measured, peak footprint by category and bytes
            # saved for backward, and left out of the timing.
            with prof.footprint((model,), (engine.optimizer,), (learner.buffer,)):
                with prof.activations():                  # the same step: bytes saved for backward
                    with prof.phase("prefix"), _autocast(env, tc.precision):
                        h = learner.prefix_forward(x, step)  # local stages: no graph, deltas in hooks
                    sync_now = sync.due(step, last=step == steps_per_epoch - 1)  # no delta, no sync
                    if sync_now and cfg.local.sync_async:
                        with prof.phase("sync"):
                            sync.start()                      # overlaps the suffix below
                    with prof.phase("suffix_fwd"), _autocast(env, tc.precision):
                        out = engine.forward(h)
                        loss = F.cross_entropy(out.float(), y)
                with prof.phase("backward"):                  # optimizer.step is timed apart (hooks)
                    engine.backward_step(loss)                # suffix grads + their all-reduce
                scheduler.step()
                loss_val = float(loss.detach())
                if not cfg.local.sync_async:
                    learner.add_loss(loss_val)
                if sync_now:
                    skipped_before = learner.skipped_updates
                    with prof.phase("sync"):
                        if not cfg.local.sync_async:
                            sync.start()
                        mean_loss = sync.finish()             # identical on every rank
                    if learner.skipped_updates > skipped_before:
                        ws.backoff()
                    if mean_loss is not None:
                        ws.update(mean_loss)
                if cfg.local.sync_async:
                    learner.add_loss(loss_val)                # the buffer is free again
            if math.isfinite(loss_val):
                epoch_sums[0] += loss_val * y.numel()
            epoch_sums[1] += y.numel()
            global_step += 1
            prof.step_end()
            bar.update(1)
            if learner.skipped_in_a_row > cfg.local.max_skipped_in_a_row:
                save_checkpoint(epoch, step + 1, mid_epoch=True)
                raise TrainingDiverged(
                    f"{learner.skipped_in_a_row} non-finite local updates in a row at epoch {epoch} "
                    f"step {step}; checkpoint saved in {run_dir / 'checkpoints'}; "
                    "lower local.lr or trainer.lr and resume")
            every = cfg.checkpoint.every_steps
            if every and global_step % every == 0 and step + 1 < steps_per_epoch:
                save_checkpoint(epoch, step + 1, mid_epoch=True)
            if on_step_end is not None:
                on_step_end(epoch, step)
        bar.close()
        epoch_time = time.perf_counter() - t0

        # ---- end of epoch: evaluate, select, checkpoint, log -------------------------------
        average_buffers(model, env)                           # BN statistics equal on every rank
        loss_sum, n_seen = all_reduce_sum(epoch_sums, env)
        train_loss = loss_sum / max(n_seen, 1)
        test_loss, acc = evaluate(model, test_loader, env, tc.precision)
        best_acc = max(best_acc, acc)
        n_steps = steps_per_epoch - first
        row: dict[str, Any] = {
            "epoch": epoch, "train_loss": train_loss, "test_loss": test_loss, "test_acc": acc,
            "epoch_time_s": epoch_time, "samples_per_s": n_steps * tc.batch_size / max(epoch_time, 1e-9),
            "step_time_s": epoch_time / max(n_steps, 1),
            "lr": scheduler.get_last_lr()[0], "boundary": learner.boundary,
            "local_lr": cfg.local.lr * ws.multiplier if learner.has_local and rule.name != "freeze" else 0.0,
            "skipped_updates": learner.skipped_updates,
            "ws_multiplier": ws.multiplier, "ws_backoffs": ws.backoffs,
            "rebuild_ms": sum(engine.rebuild_ms[n_rebuilds:]),
            "grad_allreduce_bytes": engine.grad_allreduce_bytes / max(engine.grad_allreduce_steps, 1),
            "delta_sync_bytes": sync.bytes_sent / max(n_steps, 1),
            "sync_ms": 1e3 * sync.seconds,
        }
        if val_loader is not None:  # data.val_fraction > 0: the held-out split tuning looks at
            row["val_loss"], row["val_acc"] = evaluate(model, val_loader, env, tc.precision)
        if learner.has_local and rule.name != "freeze":
            row["auto_frozen"] = learner.auto_freeze.flags(learner.boundary)  # per local stage, 1 = frozen
        if schedule is not None:
            u = relative_update(transition, stage_weights(model.stages[learner.boundary]))
            decision = schedule.observe(epoch, u)
            row["u"] = u
            if isinstance(schedule, DynamicSelector):
                row["u_ratio"], row["moved"] = decision["u_ratio"], decision["moved"]
        row.update(prof.epoch_end(learner.boundary, engine.optimizer))  # step_time_s: mean timed step
        drift = learner.drift()
        if drift:
            row["drift_max"] = max(drift.values())
            row["drift_mean"] = sum(drift.values()) / len(drift)
        # Checkpoint before logging: a crash in between re-runs the epoch, never duplicates a row.
        save_checkpoint(epoch, steps_per_epoch, mid_epoch=False)
        logger.log(row)
        if env.is_main:
            print(f"epoch {epoch}: boundary {learner.boundary} train_loss {train_loss:.4f} "
                  f"test_acc {acc:.2f}% time {epoch_time:.1f}s")
        if on_epoch_end is not None:
            on_epoch_end(epoch, model, learner, engine)

    learner.remove_hooks()
    prof.close()
    end_to_end = time.perf_counter() - t_start
    # The headline first (end-to-end, speedup, footprint, activations, bytes per step), then the rest.
    summary = prof.summary(end_to_end_s=end_to_end, last_row=row) or {"end_to_end_s": end_to_end}
    summary.update({
        "final_test_acc": acc, "best_test_acc": best_acc, "final_boundary": learner.boundary,
        "boundary_per_epoch": boundaries,
        "world_size": env.world_size, "mode": cfg.mode, "rule": rule.name,
    })
    if summary.get("speedup") is not None or "footprint_bytes" in summary:
        summary["headline"] = headline(summary)
    logger.finish(summary)
    if env.is_main and "headline" in summary:
        print(summary["headline"], flush=True)  # the run's last line
    return summary
