"""DeepSpeed (ZeRO stage 0, 1 or 2) over the SGD suffix only, rebuilt when the boundary moves.

What this engine owns
---------------------
* One **persistent torch optimizer** (``build_optimizer`` over the suffix's trainable
  parameters). Every ``deepspeed.initialize`` receives this same object, so its
  ``param_groups`` dicts (``lr``, ``initial_lr``) survive rebuilds and the trainer's
  ``LambdaLR``, built once on :attr:`DeepSpeedEngine.optimizer`, keeps driving the LR that
  DeepSpeed really uses (ZeRO and the mixed-precision wrappers step this very optimizer, only
  with flat fp32 tensors in place of the parameters).
* A DeepSpeed engine over ``nn.Sequential(*model.stages[boundary:])``. The local prefix is
  never in it, nor in its optimizer (asserted at every build), so neither ZeRO's gradient
  reduction nor an fp32 master copy can ever touch a Hebbian-updated weight.

What a rebuild carries over (``set_boundary``)
----------------------------------------------
The optimizer state of every parameter that stays SGD (SGD momentum buffers; AdamW moments
and step), its fp32 master weight under bf16/fp16, and the dynamic loss scale (fp16):

* ZeRO 0, fp32: DeepSpeed steps the torch optimizer on the parameters themselves, so the state
  is keyed by the parameters and simply stays; the newly local ones are dropped from it.
* ZeRO 1/2 (any precision): the torch optimizer steps one flat fp32 partition per group and
  rank. Each parameter's slice of it is located through DeepSpeed's tensor-fragment map
  (``param._hp_mapping``: offset in the parameter, offset in the partition, length; the map
  ``deepspeed.utils.safe_get_full_optimizer_state`` uses). Before the rebuild every rank writes
  its fragments into zero-filled per-parameter tensors and one all-reduce (a sum: fragments are
  disjoint, so it is exact) assembles the full state on every rank; after the rebuild every
  rank copies its new fragments into fresh state tensors of the new partitions.
* ZeRO 0 with bf16/fp16: DeepSpeed's FP16_UnfusedOptimizer steps one fp32 copy per parameter
  (FP16_Optimizer, only chosen for FusedAdam, one flat copy per group); nothing is
  partitioned, so the same copy-out/copy-in runs without a collective.

Checkpoints: :meth:`DeepSpeedEngine.state_dict` returns the same per-parameter, world-size
independent form as ``torch.optim.Optimizer.state_dict()`` over the suffix (plus fp32 masters
and the loss scale). Under ZeRO 1/2 assembling it is a collective: **every rank must call it**.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distlocal.config import DeepSpeedEngineConfig, TrainerConfig
from distlocal.errors import ConfigError
from distlocal.models.staged import StagedModel
from distlocal.parallel.engine import Engine, build_optimizer
from distlocal.parallel.env import DistEnv

_LP_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16}
# Dynamic loss-scaler attributes carried across a rebuild (fp16), where the scaler has them.
_SCALER_ATTRS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
_MASTER = "__fp32_master__"  # pseudo state key: the fp32 master weight of a bf16/fp16 parameter


def _per_element(key: str, value: Any, param: torch.Tensor) -> bool:
    """Whether an optimizer-state entry has one value per element of ``param`` (not AdamW's ``step``)."""
    return torch.is_tensor(value) and key != "step" and value.numel() == param.numel()


@dataclass(frozen=True, eq=False)
class _Fragment:
    """The slice of one parameter held, on this rank, by a tensor the torch optimizer steps."""

    param: nn.Parameter
    hp: torch.Tensor  # the fp32 tensor in the torch optimizer's param_groups (its state's key)
    lp_start: int  # offset inside the flattened parameter
    hp_start: int  # offset inside ``hp`` (flattened)
    numel: int


def _import_deepspeed(device: torch.device) -> Any:
    """Import deepspeed with the accelerator matching ``device`` (it is chosen once, at first use)."""
    if device.type == "cpu":
        # DeepSpeed picks CUDA whenever it is installed; on CPU it must be told, before import.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ConfigError(
            "engine=deepspeed needs the deepspeed package: pip install -e '.[deepspeed]'") from exc
    accel = get_accelerator().device_name()
    if accel != device.type:
        raise ConfigError(
            f"engine=deepspeed: DeepSpeed's accelerator is '{accel}' but trainer.device resolved to "
            f"'{device.type}'; set DS_ACCELERATOR={device.type} (CPU runs: DS_ACCELERATOR=cpu)")
    return deepspeed


class DeepSpeedEngine(Engine):
    """A DeepSpeed engine over ``stages[boundary:]``, rebuilt (state carried) when the boundary moves."""

    name = "deepspeed"

    def __init__(
        self, model: StagedModel, env: DistEnv, trainer_cfg: TrainerConfig, cfg: DeepSpeedEngineConfig
    ) -> None:
        super().__init__(model, env, trainer_cfg)
        self.cfg = cfg
        if cfg.zero_stage not in (0, 1, 2):
            raise ConfigError(
                f"engine.zero_stage={cfg.zero_stage} is not supported; valid: 0, 1, 2 (stage 3 partitions "
                "the parameters themselves, which the local prefix updates in place: see docs/deepspeed.md)")
        if cfg.gradient_clipping < 0:
            raise ConfigError("engine.gradient_clipping must be >= 0 (0 = off)")
        self._ds = _import_deepspeed(env.device)
        self.lp_dtype: torch.dtype | None = _LP_DTYPES.get(trainer_cfg.precision)
        self._check_precision()
        self._ensure_process_group()
        self._optimizer = build_optimizer(self.suffix_parameters(), trainer_cfg)
        # The parameters of each group in build order; ZeRO replaces group["params"] by flat
        # tensors, and a rebuild restores these lists (minus the newly local parameters).
        self._group_params: list[list[nn.Parameter]] = [list(g["params"])
                                                        for g in self._optimizer.param_groups]
        self.engine: Any = None
        self._bytes_per_step = 0
        self._build()

    # ------------------------------------------------------------------ set-up
    def _check_precision(self) -> None:
        from deepspeed.accelerator import get_accelerator

        accel = get_accelerator()
        if self.lp_dtype is torch.bfloat16 and not accel.is_bf16_supported():
            raise ConfigError(
                f"trainer.precision=bf16 with engine=deepspeed: the {accel.device_name()} accelerator "
                "does not support bf16; use trainer.precision=32")
        if self.lp_dtype is torch.float16 and not accel.is_fp16_supported():
            raise ConfigError(
                f"trainer.precision=16 with engine=deepspeed: the {accel.device_name()} accelerator "
                "does not support fp16; use trainer.precision=bf16 or 32")

    def _ensure_process_group(self) -> None:
        """DeepSpeed always needs a process group; a plain ``python`` run gets a 1-rank one."""
        if dist.is_initialized():
            return
        if self.env.distributed:  # init_distributed would have made it
            raise RuntimeError("world size > 1 but no process group: call init_distributed first")
        backend = self.cfg.backend if self.cfg.backend != "auto" else (
            "nccl" if self.env.device.type == "cuda" else "gloo")
        # An in-memory store: no port to pick, nothing else to rendezvous with.
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        # DeepSpeed asserts the launcher's variables are set; a single process is rank 0 of 1.
        for var, value in (("LOCAL_RANK", "0"), ("RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(var, value)

    def ds_config(self) -> dict[str, Any]:
        """The DeepSpeed config dict composed from ``engine.*`` and ``trainer.*``."""
        per_rank = self.trainer_cfg.batch_size // self.env.world_size
        zero: dict[str, Any] = {"stage": self.cfg.zero_stage}
        if self.cfg.zero_stage > 0:
            # ZeRO allocates its reduction bucket at full size: 5e8 elements (DeepSpeed's default)
            # made a CPU step of an 0.3M-parameter suffix take 3 s instead of 0.2 s. A bucket
            # larger than the whole suffix gradient buys nothing, so cap both at it (even: the
            # all-gather bucket must be a multiple of 2).
            numel = sum(p.numel() for p in self.suffix_parameters())
            cap = max(2, numel + numel % 2)
            zero.update(allgather_bucket_size=min(int(self.cfg.allgather_bucket_size), cap),
                        reduce_bucket_size=min(int(self.cfg.reduce_bucket_size), cap),
                        overlap_comm=self.cfg.overlap_comm)
        return {
            "train_micro_batch_size_per_gpu": per_rank,
            "gradient_accumulation_steps": 1,
            "train_batch_size": per_rank * self.env.world_size,
            "zero_optimization": zero,
            "gradient_clipping": self.cfg.gradient_clipping,
            "bf16": {"enabled": self.lp_dtype is torch.bfloat16},
            "fp16": {"enabled": self.lp_dtype is torch.float16},
            # Since 0.19 DeepSpeed casts only the parameters unless told to cast the buffers too; a
            # suffix BatchNorm with bf16 weights and fp32 running statistics then fails its first
            # forward ("expected scalar type BFloat16 but found Float").
            **({"data_types": {"buffer_dtype": str(self.lp_dtype).removeprefix("torch.")}}
               if self.lp_dtype is not None else {}),
            "wall_clock_breakdown": self.cfg.wall_clock_breakdown,
            # A torch SGD/AdamW under ZeRO is "untested" for DeepSpeed; it steps flat fp32
            # partitions elementwise, which is exactly the same maths.
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,  # the trainer logs; DeepSpeed's own lines would be noise
        }

    def _local_parameters(self) -> list[nn.Parameter]:
        return [p for s in self.model.stages[: self.boundary] for p in s.parameters()]

    def _build(self) -> None:
        """``deepspeed.initialize`` over the current suffix with the persistent torch optimizer."""
        suffix = nn.Sequential(*self.model.stages[self.boundary:])
        in_opt = {id(p) for g in self._optimizer.param_groups for p in g["params"]}
        local = self._local_parameters()
        # The invariant of docs/design.md ("The distributed step"): a local parameter is never in the
        # engine's optimizer.
        assert not any(id(p) in in_opt for p in local), "a local parameter is in the DeepSpeed optimizer"
        assert all(not p.requires_grad for p in local), "a local parameter still requires grad"
        trainable = self.suffix_parameters()
        assert in_opt == {id(p) for p in trainable}, "the optimizer must hold exactly the suffix's trainables"
        self.engine, _, _, _ = self._ds.initialize(model=suffix, optimizer=self._optimizer,
                                                   config=self.ds_config(), dist_init_required=False)
        assert not any(getattr(p, "_hp_mapping", None) is not None for p in local)
        # DeepSpeed drops empty param groups; the group-by-group bookkeeping here assumes none was.
        assert len(self._optimizer.param_groups) == len(self._group_params)
        itemsize = torch.empty(0, dtype=self.engine.communication_data_type).element_size()
        self._bytes_per_step = sum(p.numel() for p in trainable) * itemsize

    # ------------------------------------------------------------------ Engine API
    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The persistent torch optimizer: DeepSpeed steps it, so its ``lr`` is the one in force."""
        return self._optimizer

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # bf16/fp16: DeepSpeed casts the suffix; the prefix output arrives in fp32 (or autocast's dtype).
        if self.lp_dtype is not None and h.is_floating_point():
            h = h.to(self.lp_dtype)
        if self.model.training:  # as DDP: training forwards only (evaluation runs the model itself)
            self._broadcast_buffers()
        return self.engine(h)

    @torch.no_grad()
    def _broadcast_buffers(self) -> None:
        """Rank 0's suffix buffers (BN running statistics) on every rank, before each training forward.

        What DDP's ``broadcast_buffers`` does, which DeepSpeed lacks: without it each rank's suffix
        BN statistics follow its own shard until the epoch-end average, so the test metrics of an
        epoch differ from DDP's and a mid-epoch checkpoint (rank 0's statistics) resumes rank 1 from
        statistics it never had. One broadcast per dtype (float statistics, int64 batch counters).
        """
        if not self.env.distributed:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for stage in self.model.stages[self.boundary:]:
            for b in stage.buffers():
                by_dtype.setdefault(b.dtype, []).append(b)
        for bufs in by_dtype.values():
            flat = torch.cat([b.reshape(-1) for b in bufs])
            dist.broadcast(flat, src=0)
            off = 0
            for b in bufs:
                b.copy_(flat[off: off + b.numel()].view_as(b))
                off += b.numel()

    def backward_step(self, loss: torch.Tensor) -> None:
        """DeepSpeed's backward (gradient reduction of the suffix) and step (also zeroes the grads)."""
        self.engine.backward(loss)
        self.engine.step()
        # No per-bucket hook in DeepSpeed: computed as the size of the gradients entering the
        # reduction (every trainable suffix parameter, in the communication dtype), the same
        # quantity the DDP engine counts from its buckets.
        self.grad_allreduce_bytes += self._bytes_per_step
        self.grad_allreduce_steps += 1

    def set_boundary(self, boundary: int, newly_local: list[nn.Parameter]) -> None:
        """Rebuild over ``stages[boundary:]``, carrying the state of the parameters that stay SGD."""
        if boundary == self.boundary:
            return
        if boundary < self.boundary:
            raise ValueError(f"the boundary never moves back ({self.boundary} -> {boundary})")
        t0 = time.perf_counter()
        gone = {id(p) for p in newly_local}
        assert all(not p.requires_grad for p in newly_local), \
            "newly local parameters must have requires_grad=False before the engine is rebuilt"
        old_boundary = self.boundary
        direct = self._direct()
        staying = [p for g in self._group_params for p in g if id(p) not in gone]
        carried: dict[nn.Parameter, dict[str, Any]] = {}
        masters: dict[nn.Parameter, torch.Tensor] = {}
        if not direct:
            # Every parameter: the newly local need their fp32 master (bf16/fp16), not their state.
            for p, st in self._gather([p for g in self._group_params for p in g]).items():
                m = st.pop(_MASTER, None)
                # A master is only valid if it still rounds to the weight: one that does not was
                # overwritten from outside (model.load_state_dict on resume) and wins.
                if m is not None and torch.equal(m.to(p.dtype), p.detach()):
                    masters[p] = m
                if id(p) not in gone and st:
                    carried[p] = st
        scaler = self._scaler_state()

        self._teardown(newly_local, masters, old_boundary, boundary)
        self._group_params = [[p for p in g if id(p) not in gone] for g in self._group_params]
        self._reset_torch_optimizer(keep_param_state=direct)
        self.boundary = boundary
        self._build()
        if not direct:
            self._scatter(carried, masters)
        self._set_scaler_state(scaler)
        assert {id(p) for p in staying} == {id(p) for p in self.suffix_parameters()}
        self.rebuild_ms.append((time.perf_counter() - t0) * 1e3)

    def close(self) -> None:
        """Destroy the DeepSpeed engine: its gradient hooks go, the model stays as it is."""
        if self.engine is None:
            return
        old, self.engine = self.engine, None
        old.destroy()
        # DeepSpeedEngine.__del__ calls destroy() again whenever the garbage collector gets to
        # it, and the ZeRO/bf16 optimizer's destroy() clears `_hp_mapping` on every parameter it
        # held -- parameters a newer engine maps by then, whose state would silently stop being
        # carried. With no optimizer left that second call has nothing to undo.
        old.optimizer = None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Per-parameter optimizer state of the suffix, as ``torch.optim.Optimizer.state_dict()``.

        ``{"optimizer": {"state": {i: {...}}, "param_groups": [...]}, "boundary", "zero_stage",
        "fp32_master": {i: tensor} (bf16/fp16 only), "loss_scaler": {...} (fp16 only)}``, where
        ``i`` indexes :meth:`suffix_parameters`. It does not depend on the ZeRO stage or the world
        size. Under ZeRO 1/2 it is assembled with a collective: call it on every rank.
        """
        params = [p for g in self._group_params for p in g]
        index = {id(p): i for i, p in enumerate(params)}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[id(p)] for p in plist]}
                  for g, plist in zip(self._optimizer.param_groups, self._group_params)]
        out: dict[str, Any] = {"boundary": self.boundary, "zero_stage": self.cfg.zero_stage}
        state: dict[int, dict[str, Any]] = {}
        if self._direct():
            state = {index[id(p)]: dict(self._optimizer.state[p])
                     for p in params if p in self._optimizer.state}
        else:
            master = {}
            for p, st in self._gather(params).items():
                if _MASTER in st:
                    master[index[id(p)]] = st.pop(_MASTER)
                if st:
                    state[index[id(p)]] = st
            if master:
                out["fp32_master"] = master
        out["optimizer"] = {"state": state, "param_groups": groups}
        scaler = self._scaler_state()
        if scaler:
            out["loss_scaler"] = scaler
        return out

    def load_state_dict(self, state: dict) -> None:
        """Load :meth:`state_dict` output saved at the same boundary (any ZeRO stage, any world size).

        Not a collective: every rank writes its own fragments from the full state it was given.
        """
        if state.get("boundary", self.boundary) != self.boundary:
            raise ValueError(f"optimizer state saved at boundary {state['boundary']}, engine is at "
                             f"{self.boundary}: set the boundary first")
        params = [p for g in self._group_params for p in g]
        opt = state["optimizer"]
        if len(opt["param_groups"]) != len(self._optimizer.param_groups):
            raise ValueError("optimizer state has a different number of param groups")
        for g, saved in zip(self._optimizer.param_groups, opt["param_groups"]):
            g.update({k: v for k, v in saved.items() if k != "params"})  # lr, initial_lr, momentum, …
        per = {params[int(i)]: dict(st) for i, st in opt["state"].items()}
        if self._direct():
            for p, st in per.items():  # own copies: AdamW's `step` is incremented in place
                self._optimizer.state[p] = {
                    k: (v.to(p.device) if _per_element(k, v, p) else v).clone() if torch.is_tensor(v) else v
                    for k, v in st.items()}
        else:
            # The fp32 tensors DeepSpeed steps are copies: after a model.load_state_dict (resume)
            # they are stale, and the next step would write them back over the loaded weights.
            # Re-take them from the model, then from the saved fp32 masters where there are some.
            masters = {p: p.detach().float() for p in params}
            masters.update({params[int(i)]: m for i, m in state.get("fp32_master", {}).items()})
            self._scatter(per, masters)
        self._set_scaler_state(state.get("loss_scaler", {}))

    # ------------------------------------------------------------------ state plumbing
    def _direct(self) -> bool:
        """True when DeepSpeed steps the torch optimizer on the parameters themselves (ZeRO 0, fp32)."""
        return self.engine.optimizer is self._optimizer

    def _hp_tensors(self) -> list[list[torch.Tensor]]:
        """Per group, the tensors the torch optimizer steps (flat partitions or fp32 copies)."""
        return [list(g["params"]) for g in self._optimizer.param_groups]

    def _fragments(self) -> tuple[list[_Fragment], bool]:
        """This rank's fragments of every suffix parameter, and whether ranks hold disjoint partitions."""
        wrapper = self.engine.optimizer
        hps = self._hp_tensors()
        frags: list[_Fragment] = []
        if hasattr(wrapper, "_link_all_hp_params"):
            # ZeRO 1/2 and BF16_Optimizer: DeepSpeed's tensor-fragment map, one flat fp32
            # partition per group on each rank.
            for p in (p for g in self._group_params for p in g):
                m = getattr(p, "_hp_mapping", None)
                if m is not None:
                    frags.append(_Fragment(p, hps[m.param_group_index][0], m.lp_fragment_address.start,
                                           m.hp_fragment_address.start, m.hp_fragment_address.numel))
            return frags, True
        if hasattr(wrapper, "fp32_groups_flat"):
            # FP16_Optimizer (fused): an unpartitioned flat fp32 copy per group, the parameters
            # back to back in group order (torch's _flatten_dense_tensors).
            for plist, flat in zip(wrapper.fp16_groups, wrapper.fp32_groups_flat):
                off = 0
                for p in plist:
                    frags.append(_Fragment(p, flat, 0, off, p.numel()))
                    off += p.numel()
            return frags, False
        if hasattr(wrapper, "fp32_groups"):
            # FP16_UnfusedOptimizer (ZeRO 0 with bf16/fp16 and a torch optimizer): one fp32 copy
            # per parameter, in the group's order.
            for plist, copies in zip(wrapper.fp16_groups, wrapper.fp32_groups):
                frags.extend(_Fragment(p, hp, 0, 0, p.numel()) for p, hp in zip(plist, copies))
            return frags, False
        raise RuntimeError(
            f"unknown DeepSpeed optimizer wrapper {type(wrapper).__name__}: cannot carry its state")

    def _group_scalars(self) -> list[dict[str, Any]]:
        """Per group, the state entries that are not per-element (AdamW's ``step``); equal on every rank."""
        out = []
        for hps in self._hp_tensors():
            state = self._optimizer.state.get(hps[0], {})
            out.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()
                        if not _per_element(k, v, hps[0])})
        return out

    def _gather(self, params: list[nn.Parameter]) -> dict[nn.Parameter, dict[str, Any]]:
        """Full per-parameter state of ``params`` (and fp32 master under bf16/fp16), on every rank.

        The torch format: ``{param: {"momentum_buffer": tensor shaped like param, "step": …}}``.
        One all-reduce over the concatenation of every (key, parameter) buffer when the ranks
        hold disjoint partitions (the sum of zero-filled fragments is exact); none otherwise.
        """
        frags, partitioned = self._fragments()
        state = self._optimizer.state
        keys = sorted({k for hps in self._hp_tensors() for hp in hps for k, v in state.get(hp, {}).items()
                       if _per_element(k, v, hp)})  # the same list on every rank
        if self.lp_dtype is not None:
            keys.append(_MASTER)
        if not keys:
            return {}
        want = {id(p) for p in params}
        offset: dict[int, int] = {}  # where each parameter starts in one key's stretch of `buf`
        total = 0
        for p in params:
            offset[id(p)] = total
            total += p.numel()
        device = self._hp_tensors()[0][0].device
        buf = torch.zeros(len(keys) * total, dtype=torch.float32, device=device)
        covered = 0
        for f in frags:
            if id(f.param) not in want:
                continue
            covered += f.numel
            for ki, k in enumerate(keys):
                src = f.hp if k == _MASTER else state[f.hp][k]
                start = ki * total + offset[id(f.param)] + f.lp_start
                buf[start: start + f.numel].copy_(src.detach().reshape(-1)[f.hp_start: f.hp_start + f.numel])
        if partitioned and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(buf)  # fragments are disjoint: the sum is the exact concatenation
            count = torch.tensor([covered], dtype=torch.int64, device=device)
            dist.all_reduce(count)
            covered = int(count.item())
        # A parameter without its fragment map would come back as zeros: fail loudly instead.
        assert covered == total, f"optimizer-state fragments cover {covered} of {total} elements"
        scalars = self._group_scalars()
        group_of = {id(p): gi for gi, plist in enumerate(self._group_params) for p in plist}
        out: dict[nn.Parameter, dict[str, Any]] = {}
        for p in params:
            starts = [ki * total + offset[id(p)] for ki in range(len(keys))]
            out[p] = {k: buf[s: s + p.numel()].view(p.shape).clone() for k, s in zip(keys, starts)}
            if _MASTER in out[p] and len(out[p]) == 1:
                continue  # no optimizer step yet: nothing but the master weight to carry
            # A copy per parameter: torch's AdamW increments its `step` tensor in place.
            group_scalars = scalars[group_of[id(p)]]
            out[p].update({k: (v.clone() if torch.is_tensor(v) else v) for k, v in group_scalars.items()})
        return out

    @torch.no_grad()
    def _scatter(
        self, per_param: dict[nn.Parameter, dict[str, Any]], masters: dict[nn.Parameter, torch.Tensor]
    ) -> None:
        """Write per-parameter state (and fp32 masters) into this rank's tensors of the current engine."""
        frags, _ = self._fragments()
        state = self._optimizer.state
        for plist, hps in zip(self._group_params, self._hp_tensors()):
            carried = [(p, per_param[p]) for p in plist if per_param.get(p)]
            if not carried:
                continue  # lazily created by the first step, as for a fresh optimizer
            tensor_keys = sorted({k for p, st in carried for k, v in st.items() if _per_element(k, v, p)})
            scalars = {k: v for k, v in carried[0][1].items() if k not in tensor_keys}  # AdamW's step
            for hp in hps:  # every tensor, also one holding only padding on this rank
                # Own copies per tensor: AdamW increments `step` in place.
                state[hp] = {**{k: (v.clone() if torch.is_tensor(v) else v) for k, v in scalars.items()},
                             **{k: torch.zeros_like(hp, dtype=torch.float32) for k in tensor_keys}}
        for f in frags:
            for k, v in per_param.get(f.param, {}).items():
                if _per_element(k, v, f.param):
                    dst = state[f.hp][k].view(-1)
                    src = v.reshape(-1)[f.lp_start: f.lp_start + f.numel]
                    dst[f.hp_start: f.hp_start + f.numel].copy_(src)
            m = masters.get(f.param)
            if m is not None:
                dst = f.hp.view(-1)
                dst[f.hp_start: f.hp_start + f.numel].copy_(m.reshape(-1)[f.lp_start: f.lp_start + f.numel])

    def _scaler_state(self) -> dict[str, Any]:
        scaler = getattr(self.engine.optimizer, "loss_scaler", None)
        if scaler is None or self.lp_dtype is not torch.float16:
            return {}
        return {a: getattr(scaler, a) for a in _SCALER_ATTRS if hasattr(scaler, a)}

    def _set_scaler_state(self, state: dict[str, Any]) -> None:
        scaler = getattr(self.engine.optimizer, "loss_scaler", None)
        if scaler is None:
            return
        for a, v in state.items():
            if hasattr(scaler, a):
                setattr(scaler, a, v)

    @torch.no_grad()
    def _teardown(
        self, newly_local: list[nn.Parameter], masters: dict[nn.Parameter, torch.Tensor], old: int, new: int
    ) -> None:
        """Destroy the engine (removes its gradient hooks) and give newly local weights their own storage."""
        self.close()
        for p in newly_local:
            # ZeRO left p.data a view of its flat buffer: a private copy lets that buffer be
            # freed. Under bf16/fp16 the local rule works in fp32, from the master weight.
            m = masters.get(p)
            if m is not None:
                p.data = m.to(p.device)
            else:
                p.data = p.data.float() if self.lp_dtype is not None else p.data.clone()
        if self.lp_dtype is not None:
            for stage in self.model.stages[old:new]:
                for b in stage.buffers():  # BN running statistics back to fp32 for the local stages
                    if b.dtype == self.lp_dtype:
                        b.data = b.data.float()

    def _reset_torch_optimizer(self, keep_param_state: bool) -> None:
        """Point the persistent optimizer's groups back at real parameters, ready for a new initialize."""
        for g, plist in zip(self._optimizer.param_groups, self._group_params):
            g["params"] = list(plist)
        if keep_param_state:
            kept = {id(p) for plist in self._group_params for p in plist}
            for p in [p for p in self._optimizer.state if id(p) not in kept]:
                del self._optimizer.state[p]  # the newly local: their momentum is freed
        else:
            self._optimizer.state.clear()  # flat-tensor state of the old engine; re-made by _scatter

