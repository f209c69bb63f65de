"""One step: the trainer's, the bench's and the all-SGD reference's step are distlocal.step.train_step,
checked bit for bit on the same model and batches."""

from __future__ import annotations

import copy

import pytest
import torch
from test_profiler import _load_script

from distlocal.config import compose
from distlocal.parallel.build import build_engine
from distlocal.parallel.env import DistEnv
from distlocal.profiler import ReferenceStep
from distlocal.trainer import Trainer

ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
SHAPE, CLASSES, BATCH = (3, 16, 16), 4, 8
# A constant LR: the bench steps no LR scheduler. The profiler is on, so its probe and footprint
# wrap the trainer's steps as in a real run (step 1 is the measured one).
TINY = ["data=synthetic", f"data.shape=[{','.join(map(str, SHAPE))}]", f"data.num_classes={CLASSES}",
        "data.train_size=32", "data.test_size=8", "model=convnet", "trainer.epochs=1",
        f"trainer.batch_size={BATCH}", "trainer.progress=false", "trainer.device=cpu",
        "trainer.lr_schedule=constant",
        "wandb.mode=disabled", "checkpoint.enabled=false"]


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, *SHAPE, generator=g), torch.randint(CLASSES, (BATCH,), generator=g))
            for _ in range(n)]


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("update_every,sync_every", [(1, 1), (2, 3)])
def test_the_bench_step_is_the_trainers_step(tmp_path, update_every: int, sync_every: int) -> None:
    """Three steps at boundary 3 through Trainer.train_step and through profiling/bench.py's variant
    give bit-identical weights, BN statistics included (with (2, 3): a delta every other step, applied
    from the delta buffer at the third)."""
    levers = [f"local.update_every={update_every}", f"local.sync_every={sync_every}"]
    trainer = Trainer.build(compose([*TINY, "mode=local", *levers]), tmp_path / "run", ENV)
    base = copy.deepcopy(trainer.model)  # boundary 0: the learner has no hooks yet
    trainer.move_boundary(3, timed=False)
    trainer._begin_epoch(0)
    bench = _load_script("bench")
    args = bench.parse_args(["--batch-size", str(BATCH), "--local-lr", str(trainer.cfg.local.lr),
                             "--update-every", str(update_every), "--sync-every", str(sync_every)])
    cfgs = {"local": bench.run_config(args, args.rule), "freeze": bench.run_config(args, "freeze")}
    variant = bench.make_variant("local", base, 3, cfgs, torch.device("cpu"))
    for step, (x, y) in enumerate(_batches(3)):
        trainer.train_step(step, iter([(x.clone(), y.clone())]))
        bench.train_step(variant.parts, x, y, step)
    assert trainer.learner.skipped_updates == 0 and trainer.learner.boundary == variant.parts.learner.boundary
    _assert_same_weights(trainer.model, variant.model)
    assert not torch.equal(trainer.model.stages[0][0].weight, base.stages[0][0].weight)  # the rule did learn


def test_the_reference_is_the_step_at_boundary_0(tmp_path) -> None:
    """The profiler's all-SGD reference, two steps, gives the weights of an all-SGD run's own steps."""
    cfg = compose([*TINY, "mode=sgd"])
    trainer = Trainer.build(cfg, tmp_path / "run", ENV)
    data = _batches(2)
    ref = ReferenceStep(copy.deepcopy(trainer.model), lambda m: build_engine(cfg.engine, m, ENV, cfg.trainer),
                        lambda: iter(data), ENV.device)
    ref.build()
    trainer._begin_epoch(0)
    for step, (x, y) in enumerate(data):
        trainer.train_step(step, iter([(x, y)]))
        ref.run()
    _assert_same_weights(trainer.model, ref.model)
