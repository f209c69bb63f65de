"""The training loop: a :class:`Trainer` whose step reads top to bottom.

A step (:meth:`Trainer.train_step`) is :func:`distlocal.step.train_step`, the one step of the
project (the profiler's all-SGD reference and ``profiling/bench.py`` run it too)::

    h = learner.prefix_forward(x)   # local stages, no autograd; hooks accumulate lr * delta
    sync.launch(step, last)         # decide whether this step syncs (async: start the all-reduce)
    out = engine.forward(h)         # SGD suffix (DDP-wrapped)
    engine.backward_step(loss)      # gradients + all-reduce of the suffix only
    sync.step(loss)                 # one all-reduce of deltas, BN stats and loss; apply

Its pieces are built by :mod:`distlocal.build`; the loop's state lives in :mod:`distlocal.loop`.

The boundary moves (never back) at epoch starts, decided by the schedule
(:meth:`Trainer.move_boundary`, also used when a checkpoint is restored).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from torch.utils.data import DataLoader
from tqdm import tqdm

from distlocal import checkpoint, tta, validation
from distlocal.build import (
    Data,
    autocast,
    build_data,
    build_step_parts,
    lr_lambda,
    seed_everything,
    warn_and_alias,
)
from distlocal.config import to_yaml
from distlocal.data import Checked, count_skipped
from distlocal.errors import ConfigError
from distlocal.local.learner import LocalLearner, unruled_note
from distlocal.local.schedule import DynamicSelector, build_schedule, relative_update, stage_weights
from distlocal.local.supervision import WeakSupervision
from distlocal.loop import LoopState, gather_sums, own_sums, rng_state, set_rng_state
from distlocal.metrics import MetricsLogger
from distlocal.models import StagedModel, build_model
from distlocal.parallel.build import build_engine
from distlocal.parallel.engine import Engine
from distlocal.parallel.env import DistEnv, all_reduce_sum, broadcast_object, init_distributed
from distlocal.parallel.sync import DeltaSync, average_buffers
from distlocal.profiler import Profiler, headline
from distlocal.profiler.clocks import TrainClocks
from distlocal.step import StepParts, set_boundary, train_step


def validate(cfg: DictConfig, world_size: int | None = None) -> None:
    """Every knob's range, type and choice, and the rules between knobs (``distlocal.validation``);
    one clear line per failure. The entry point runs the same pass before Hydra writes anything."""
    validation.validate(cfg, world_size)


EpochHook = Callable[[int, StagedModel, LocalLearner, Engine], None]
StepHook = Callable[[int, int], None]


class TrainingDiverged(RuntimeError):
    """Too many non-finite local updates in a row; a checkpoint was saved before stopping."""


class Trainer:
    """A LoCal+SGD run: its parts, built once by :meth:`build`, and the loop over them.

    The stateful parts (model, learner, engine, LR scheduler, weak supervision, boundary schedule)
    each save and restore their own ``state_dict``; :meth:`state_dict` gathers them with the loop's
    counters, the RNG and the transition weights, under the keys checkpoints have always had.
    """

    def __init__(self, cfg: DictConfig, run_dir: Path, env: DistEnv, data: Data, model: StagedModel,
                 learner: LocalLearner, sync: DeltaSync, engine: Engine, scheduler: LRScheduler,
                 schedule: Any, ws: WeakSupervision, prof: Profiler) -> None:
        self.cfg, self.run_dir, self.env, self.data = cfg, run_dir, env, data
        self.model, self.learner, self.sync, self.engine = model, learner, sync, engine
        self.scheduler, self.schedule, self.ws, self.prof = scheduler, schedule, ws, prof
        self.loop = LoopState()
        self.transition: dict[str, torch.Tensor] = {}  # the transition stage's weights at epoch start
        self._resume_rng: dict[str, Any] | None = None  # restored where the first epoch reaches it
        self.logger: MetricsLogger | None = None
        self.on_epoch_end: EpochHook | None = None
        self.on_step_end: StepHook | None = None
        self._loss_acc: torch.Tensor | None = None  # the loss sum since the last read_loss, on the device
        self.clocks = TrainClocks(env.device)  # profiler/clocks.py; time to accuracy: tta.py
        self.tta = tta.TimeToAccuracy("test" if data.val is None else "val")

    @classmethod
    def build(cls, cfg: DictConfig, run_dir: Path, env: DistEnv | None = None) -> Trainer:
        """Validate ``cfg``, build every part, resume from the run's checkpoint if asked, open the
        run directory (rank 0 writes it)."""
        # Before anything is built: without an env, init_distributed reads the same WORLD_SIZE.
        validate(cfg, None if env is None else env.world_size)
        warn_and_alias(cfg)
        env = env or init_distributed(cfg.trainer.device, cfg.engine.backend, cfg.engine.timeout_s)
        tc, lc = cfg.trainer, cfg.local
        seed_everything(tc.seed, tc.deterministic)
        resume = checkpoint.find_resume(cfg.resume, run_dir)  # every rank reads the same file
        data = build_data(cfg, env)
        model = build_model(cfg.model, data.in_shape, data.num_classes).to(env.device)
        model.train()
        prof = Profiler(cfg.profiler, model, env.device, run_dir, verbose=env.is_main)  # docs/profiling.md
        schedule = None if cfg.mode == "sgd" else build_schedule(cfg.schedule, model.num_stages, tc.epochs)
        parts = build_step_parts(cfg, model, env, timer=prof.phase)
        ws = WeakSupervision.from_config(lc.weak_supervision)
        scheduler = LambdaLR(parts.engine.optimizer, lr_lambda(tc, data.steps_per_epoch))
        # The all-SGD reference: a boundary-0 copy behind the run's own engine, optimizer, precision
        # and loader, a few steps per epoch between the run's (built at the first local epoch).
        prof.attach_reference(lambda m: build_engine(cfg.engine, m, env, tc),
                              lambda: iter(Checked(data.train, env, lockstep=True)),
                              autocast=parts.autocast)
        learner, sync, engine = parts.learner, parts.sync, parts.engine
        trainer = cls(cfg, run_dir, env, data, model, learner, sync, engine, scheduler, schedule, ws, prof)
        if resume is not None:
            trainer.load_state_dict(resume[1])
            if env.is_main:
                print(f"distlocal: resuming from {resume[0]} at epoch {trainer.loop.start_epoch} step "
                      f"{trainer.loop.step_in_epoch if trainer.loop.mid_epoch else 0} "
                      f"(saved by world size {resume[1]['world_size']}, now {env.world_size})")
        trainer.open_run_dir()
        return trainer

    def open_run_dir(self) -> None:
        """Rank 0 alone writes the run directory: the config, then the metrics as epochs end."""
        cfg, env = self.cfg, self.env
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        tags = [f"mode:{cfg.mode}", f"rule:{self.learner.rule.name}", f"model:{cfg.model}",
                f"data:{cfg.data.name}", f"engine:{cfg.engine.name}", f"world:{env.world_size}"]
        # Resuming: the rows of the epochs already done stay, the later ones are written again.
        self.logger = MetricsLogger(self.run_dir, cfg, enabled=env.is_main, tags=tags,
                                    keep_epochs_below=self.loop.start_epoch,
                                    keep_evals_upto=self.loop.global_step)  # tta: evaluation rows
        if env.is_main:
            print(f"distlocal: run dir {self.run_dir.resolve()} | model {cfg.model} "
                  f"({self.model.num_stages} stages) | mode {cfg.mode} | data {cfg.data.name} | "
                  f"world {env.world_size} | device {env.device}"
                  f"{unruled_note(self.model) if cfg.mode == 'local' else ''}")

    # ---------------------------------------------------------------- the boundary
    def move_boundary(self, target: int, timed: bool = True) -> None:
        """Move the boundary to ``target`` (never back): the one place it moves, at an epoch start
        and when a checkpoint is restored. The newly local stages leave the engine, which is
        rebuilt over the new suffix; weak supervision takes a new reference loss.

        ``timed``: the rebuild counts in the profiler's epoch (not at resume: no epoch has begun,
        and the time would land in the first epoch's row).
        """
        if target <= self.learner.boundary:
            return
        with self.prof.phase("rebuild") if timed else contextlib.nullcontext():
            set_boundary(self.learner, self.engine, target)
        self.ws.reset_reference()

    # ---------------------------------------------------------------- one step
    def train_step(self, step: int, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One LoCal+SGD step on the next batch (:func:`distlocal.step.train_step`): the prefix
        learns in its forward, the suffix by SGD; the profiler measures it from outside."""
        prof, env = self.prof, self.env
        prof.step_begin(step)                                 # times a few steps, phase by phase
        with prof.phase("data"):
            x, y = next(batches)
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
        self.learner.lr = self.cfg.local.lr * self.ws.multiplier  # weak supervision scales the local lr
        # One step per epoch (the second) is measured, peak footprint by category and bytes
        # saved for backward, and left out of the timing.
        with prof.footprint((self.model,), (self.engine.optimizer,), (self.learner.buffer,)):
            loss, synced = train_step(self.parts, x, y, step, last=step == self.data.steps_per_epoch - 1,
                                      probe=prof)
        if synced.skipped:                                    # a non-finite update: lower the local lr
            self.ws.backoff()
        if synced.mean_loss is not None:
            self.ws.update(synced.mean_loss)
        # The loss stays on the device (a read per step would stall an accelerator's queue): summed
        # here in float64, read every trainer.log_every steps, at checkpoints and at the epoch end.
        term = torch.where(torch.isfinite(loss), loss.double() * y.numel(), 0.0)  # non-finite: left out
        self._loss_acc = term if self._loss_acc is None else self._loss_acc + term
        self.loop.epoch_sums[1] += y.numel()
        self.loop.global_step += 1
        if self.loop.global_step % self.cfg.trainer.log_every == 0:
            self.read_loss()
        prof.step_end()

    def read_loss(self) -> float:
        """Move the device-side loss sum into the epoch's sums (one host read); returns the epoch's
        mean training loss so far. Called at fixed points (every ``trainer.log_every`` steps, before a
        checkpoint, at the epoch end), so a resumed run sums in the same groups as an uninterrupted one."""
        sums = self.loop.epoch_sums
        if self._loss_acc is not None:
            sums[0] += float(self._loss_acc)
            self._loss_acc = None
        return sums[0] / max(sums[1], 1.0)

    @property
    def parts(self) -> StepParts:
        """What :func:`distlocal.step.train_step` runs through: this run's learner, engine, sync,
        LR scheduler and autocast."""
        return StepParts(self.learner, self.engine, self.sync, self.scheduler, self.autocast)

    def autocast(self) -> AbstractContextManager[None]:
        """Mixed precision as ``trainer.precision`` says (a no-op in fp32)."""
        return autocast(self.env, self.cfg.trainer.precision)

    # ---------------------------------------------------------------- one epoch
    def run_epoch(self, epoch: int) -> dict[str, Any]:
        """Move the boundary, run the epoch's steps (from a mid-epoch checkpoint's, on resume),
        evaluate, checkpoint and log; returns the epoch's metrics row."""
        first = self._begin_epoch(epoch)
        n = self.data.steps_per_epoch
        self.clocks.start_epoch()  # clocks: wall (epoch_time_s), CPU, device; evaluation excluded
        # A context: an error line (a corrupt sample, a failed checkpoint) starts on a cleared line.
        with tqdm(total=n, initial=first, desc=f"epoch {epoch}", leave=False, mininterval=1.0,
                  disable=not (self.env.is_main and self.cfg.trainer.progress)) as bar:
            batches = self._batches(first)
            for step in range(first, n):
                self.clocks.step_begin()
                self.train_step(step, batches)
                self.clocks.step_end()
                bar.update(1)
                if self.loop.global_step % self.cfg.trainer.log_every == 0:  # read there, no new read
                    bar.set_postfix(loss=f"{self.loop.epoch_sums[0] / max(self.loop.epoch_sums[1], 1):.4f}")
                self._after_step(epoch, step)
        return self._end_epoch(epoch, first, self.clocks.pause())

    def _begin_epoch(self, epoch: int) -> int:
        """The epoch's boundary and counters; returns its first step (> 0 resuming mid-epoch)."""
        loop, learner = self.loop, self.learner
        resuming_mid = loop.mid_epoch and loop.epoch == epoch
        first = loop.step_in_epoch if resuming_mid else 0
        self.engine.reset_comm_stats()                        # before the move: its rebuild is this epoch's
        self.move_boundary(0 if self.schedule is None else self.schedule.boundary(epoch))
        if not resuming_mid:  # else: restored with the checkpoint
            # The transition stage's weights at epoch start, for the selector's u (saved mid-epoch).
            self.transition = stage_weights(self.model.stages[learner.boundary])
        loop.boundaries.append(learner.boundary)
        loop.epoch = epoch
        self.data.sampler.set_epoch(epoch)
        self.sync.reset_counters()
        if first == 0:
            loop.epoch_sums = [0.0, 0.0]
        # Timed windows hold whole lever periods: one delta per update_every, one sync per sync_every.
        lc = self.cfg.local
        period = math.lcm(lc.update_every, lc.sync_every) if learner.has_local else 1
        self.prof.epoch_start(self.engine.optimizer, steps=self.data.steps_per_epoch,
                              boundary=learner.boundary, first=first, period=period,
                              sync_every=lc.sync_every if learner.has_local else 1)
        return first

    def _batches(self, first: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from step ``first`` on."""
        # Resume restores the RNG where the uninterrupted run had it: at an epoch end that is
        # before the loader's iterator draws its seed; mid-epoch, after the batches already done
        # (the sampler's order is a function of (seed, epoch) alone, so skipping them is exact).
        rng, self._resume_rng = self._resume_rng, None
        if rng is not None and first == 0:
            set_rng_state(rng)
        batches = iter(Checked(self.data.train, self.env, lockstep=True))  # data.on_corrupt (data/corrupt.py)
        for _ in range(first):
            next(batches)
        if rng is not None and first > 0:
            set_rng_state(rng)
        return batches

    def _after_step(self, epoch: int, step: int) -> None:
        """Stop on divergence, checkpoint every ``checkpoint.every_steps``, run the step hook."""
        loop, learner = self.loop, self.learner
        loop.step_in_epoch, loop.mid_epoch = step + 1, True
        if learner.skipped_in_a_row > self.cfg.local.max_skipped_in_a_row:
            self.save_checkpoint()
            raise TrainingDiverged(
                f"{learner.skipped_in_a_row} non-finite local updates in a row at epoch {epoch} "
                f"step {step}; checkpoint saved in {self.run_dir / 'checkpoints'}; "
                "lower local.lr or trainer.lr and resume")
        every_eval = self.cfg.trainer.eval_every_steps  # tta: evaluate before the checkpoint that records it
        if every_eval and loop.global_step % every_eval == 0 and step + 1 < self.data.steps_per_epoch:
            tta.periodic_evaluation(self, epoch)
        every = self.cfg.checkpoint.every_steps
        if every and loop.global_step % every == 0 and step + 1 < self.data.steps_per_epoch:
            self.save_checkpoint()
        if self.on_step_end is not None:
            self.on_step_end(epoch, step)

    def _end_epoch(self, epoch: int, first: int, epoch_time: float) -> dict[str, Any]:
        """Evaluate, select the next boundary, checkpoint, log; returns the metrics row."""
        average_buffers(self.model, self.env)                 # BN statistics equal on every rank
        row = self._epoch_row(epoch, first, epoch_time)
        eval_row = tta.epoch_end_evaluation(self, row)  # clocks + tta: the epoch's keys, its point
        self.loop.step_in_epoch, self.loop.mid_epoch = self.data.steps_per_epoch, False
        # Checkpoint before logging: a crash in between re-runs the epoch, never duplicates a row.
        self.save_checkpoint()
        self.logger.log(row)
        if eval_row is not None:
            self.logger.log(eval_row)
        if self.env.is_main:
            print(f"epoch {epoch}: boundary {self.learner.boundary} train_loss {row['train_loss']:.4f} "
                  f"test_acc {row['test_acc']:.2f}% time {epoch_time:.1f}s")
        if self.on_epoch_end is not None:
            self.on_epoch_end(epoch, self.model, self.learner, self.engine)
        return row

    def _epoch_row(self, epoch: int, first: int, epoch_time: float) -> dict[str, Any]:
        """The epoch's metrics row (also updates the accuracies and feeds the boundary selector)."""
        loop, learner, tc, env = self.loop, self.learner, self.cfg.trainer, self.env
        skipped = count_skipped(self.data.train, self.data.steps_per_epoch)  # data.on_corrupt=skip
        self.read_loss()
        loss_sum, n_seen, skipped = all_reduce_sum([*loop.epoch_sums, skipped], env)
        test_loss, loop.acc = self.evaluate(self.data.test)
        loop.best_acc = max(loop.best_acc, loop.acc)
        n_steps = self.data.steps_per_epoch - first
        learns = learner.has_local and learner.rule.name != "freeze"
        row: dict[str, Any] = {
            "epoch": epoch, "train_loss": loss_sum / max(n_seen, 1), "test_loss": test_loss,
            "test_acc": loop.acc,
            "epoch_time_s": epoch_time, "samples_per_s": n_steps * tc.batch_size / max(epoch_time, 1e-9),
            "step_time_s": epoch_time / max(n_steps, 1),
            "lr": self.scheduler.get_last_lr()[0], "boundary": learner.boundary,
            "local_lr": self.cfg.local.lr * self.ws.multiplier if learns else 0.0,
            "skipped_updates": learner.skipped_updates, "data_skipped": int(skipped),
            "ws_multiplier": self.ws.multiplier, "ws_backoffs": self.ws.backoffs,
            **self.engine.comm_stats(),                       # rebuild_ms, grad_allreduce_bytes
            "delta_sync_bytes": self.sync.bytes_sent / max(n_steps, 1),
            "sync_ms": 1e3 * self.sync.seconds,
        }
        if self.data.val is not None:
            row["val_loss"], row["val_acc"] = self.evaluate(self.data.val)
        if learns:
            row["auto_frozen"] = learner.auto_freeze.flags(learner.boundary)  # per local stage, 1 = frozen
        if self.schedule is not None:
            u = relative_update(self.transition, stage_weights(self.model.stages[learner.boundary]))
            decision = self.schedule.observe(epoch, u)
            row["u"] = u
            if isinstance(self.schedule, DynamicSelector):
                row["u_ratio"], row["moved"] = decision["u_ratio"], decision["moved"]
        # step_time_s becomes the mean timed step
        row.update(self.prof.epoch_end(learner.boundary, self.engine.optimizer))
        if learner.compile_s:  # local.compile's first-step cost (cumulative; in epoch_time_s too)
            row["compile_s"] = learner.compile_s
        drift = learner.drift()
        if drift:
            row["drift_max"] = max(drift.values())
            row["drift_mean"] = sum(drift.values()) / len(drift)
        return row

    @torch.no_grad()
    def evaluate(self, loader: DataLoader) -> tuple[float, float]:
        """Loss and top-1 accuracy (%) over the whole of ``loader``'s set, summed across ranks."""
        model, env = self.model, self.env
        model.eval()
        loss_sum = correct = n = 0.0
        batches = Checked(loader, env, lockstep=False)        # a corrupt sample stops every rank
        for x, y in batches:
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            with self.autocast():
                out = model(x)
            loss_sum += float(F.cross_entropy(out.float(), y, reduction="sum"))
            correct += float((out.argmax(1) == y).sum())
            n += y.numel()
        model.train()
        loss_sum, correct, n = all_reduce_sum([loss_sum, correct, n], env)
        batches.finish()
        return loss_sum / max(n, 1), 100.0 * correct / max(n, 1)

    # ---------------------------------------------------------------- checkpoints
    def _parts(self) -> dict[str, Any]:
        """The stateful parts by checkpoint key, in restore order (``None``: absent in this run)."""
        return {"model": self.model, "learner": self.learner, "engine": self.engine,
                "scheduler": self.scheduler, "weak_supervision": self.ws, "schedule": self.schedule}

    def state_dict(self) -> dict[str, Any]:
        """The whole run's state: every part's ``state_dict``, the loop, the RNG, the transition weights.

        A collective: every rank calls it (DeepSpeed ZeRO 1/2 gathers the engine's state, and the
        ranks' sums of the epoch in progress are gathered).
        """
        state = {name: None if part is None else part.state_dict() for name, part in self._parts().items()}
        self.read_loss()  # the device-side loss sum joins the epoch's sums
        loop = asdict(self.loop)
        loop["epoch_sums"] = gather_sums(loop["epoch_sums"], self.env) if loop["mid_epoch"] \
            else [loop["epoch_sums"]]
        state.update(loop)
        state.update(boundary=self.learner.boundary, world_size=self.env.world_size, rng=rng_state(),
                     transition=self.transition if self.loop.mid_epoch else None)
        state.update(clocks=self.clocks.state_dict(self.env), tta=self.tta.state_dict())  # clocks + tta
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output: the boundary first (it rebuilds the learner's hooks
        and the engine), then each part's state, then the loop (the epoch in progress re-runs from
        its saved step with this rank's share of the saved sums)."""
        missing = [k for k in (*self._parts(), *(f.name for f in fields(LoopState)), "boundary", "world_size",
                               "rng", "transition") if k not in state]
        if missing:
            raise ConfigError(f"the checkpoint lacks {', '.join(missing)}: it was not written by this "
                              "version of distlocal; start a new run directory or resume from another "
                              "checkpoint")
        self.move_boundary(state["boundary"], timed=False)
        # After the rebuild: under bf16/fp16 DeepSpeed re-casts newly local weights from its masters.
        for name, part in self._parts().items():
            if part is not None and state[name] is not None:
                part.load_state_dict(state[name])
        self.loop = LoopState(**{f.name: state[f.name] for f in fields(LoopState)})
        self.loop.boundaries = list(self.loop.boundaries)
        if self.loop.mid_epoch:
            self.loop.epoch_sums = own_sums(state["epoch_sums"], state["world_size"], self.env)
            self.loop.boundaries = self.loop.boundaries[:-1]  # the epoch in progress re-records its boundary
            self.transition = state["transition"]
        self._resume_rng = state["rng"]
        if "clocks" in state:  # clocks + tta (checkpoints from before them start both at zero)
            self.clocks.load_state_dict(state["clocks"])
            self.tta.load_state_dict(state["tta"])

    def save_checkpoint(self) -> None:
        """Write :meth:`state_dict` from rank 0 (every rank calls it); a failed write stops every rank."""
        if not self.cfg.checkpoint.enabled:
            return
        state = self.state_dict()
        error = None
        if self.env.is_main:
            try:
                checkpoint.save(self.run_dir / "checkpoints", state, keep=self.cfg.checkpoint.keep)
            except checkpoint.CheckpointError as exc:  # disk full, I/O error: last.pt is the previous one
                error = str(exc)
        # Every rank learns the outcome, so a failed write stops them all with rank 0's one line
        # instead of leaving the others waiting in the next collective until the timeout.
        if self.env.distributed:
            error = broadcast_object(error, self.env)
        if error is not None:
            raise checkpoint.CheckpointError(error)

    # ---------------------------------------------------------------- the run
    def fit(self, started_at: float | None = None) -> dict[str, Any]:
        """Run the remaining epochs; returns the run summary (also written by the logger).

        ``started_at``: the ``time.perf_counter()`` the end-to-end time counts from (default: now).
        """
        t_start = time.perf_counter() if started_at is None else started_at
        row: dict[str, Any] | None = None  # the last epoch's row: the summary's headline
        for epoch in range(self.loop.start_epoch, self.cfg.trainer.epochs):
            row = self.run_epoch(epoch)
        self.learner.remove_hooks()
        self.prof.close()
        end_to_end = time.perf_counter() - t_start
        # The headline first (end-to-end, speedup, footprint, activations, bytes per step), then the rest.
        summary = self.prof.summary(end_to_end_s=end_to_end, last_row=row) or {"end_to_end_s": end_to_end}
        summary.update({
            "final_test_acc": self.loop.acc, "best_test_acc": self.loop.best_acc,
            "final_boundary": self.learner.boundary, "boundary_per_epoch": self.loop.boundaries,
            "world_size": self.env.world_size, "mode": self.cfg.mode, "rule": self.learner.rule.name,
            "data_skipped": sum(r.get("data_skipped", 0) for r in self.logger.rows),
        })
        summary.update(tta.run_summary(self))  # clocks + tta: train_*_s, time_to_acc, time_to_final_acc_*
        profiled = summary.get("speedup") is not None or "footprint_bytes" in summary
        line = headline(summary, row) if profiled else None
        line = tta.with_time_to_accuracy(line, summary)  # tta: ... | <final acc> at <CPU s>
        if line is not None:
            summary["headline"] = line
        self.logger.finish(summary)
        if self.env.is_main and "headline" in summary:
            print(summary["headline"], flush=True)  # the run's last line
        return summary


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
    t_start = time.perf_counter()
    trainer = Trainer.build(cfg, run_dir, env)
    trainer.on_epoch_end, trainer.on_step_end = on_epoch_end, on_step_end
    return trainer.fit(started_at=t_start)
