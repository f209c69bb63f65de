"""Device and host memory readers: CUDA peaks, NVML, process RSS, and the bytes of parameters,
gradients and optimizer state. The peak footprint of a step by category is :mod:`.footprint`'s."""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

_NVML: dict[str, Any] = {}  # {"ok": bool} once initialised (or failed) — NVML is tried once per process


def nvml_used_bytes(device_index: int = 0) -> int | None:
    """Device memory in use (all processes) as NVML reports it; ``None`` when NVML is unavailable.

    ``nvidia-ml-py`` imports fine without a driver and raises ``NVMLError_LibraryNotFound`` at
    ``nvmlInit``: that (and any NVML error) yields ``None``, never an exception. The device is
    found by UUID when torch knows it, so ``CUDA_VISIBLE_DEVICES`` remapping is respected.
    """
    try:
        import pynvml
    except ImportError:
        return None
    if "ok" not in _NVML:
        try:
            pynvml.nvmlInit()
            _NVML["ok"] = True
        except pynvml.NVMLError:
            _NVML["ok"] = False
    if not _NVML["ok"]:
        return None
    handle = None
    try:
        uuid = str(getattr(torch.cuda.get_device_properties(device_index), "uuid", "") or "")
        if uuid:
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    except (pynvml.NVMLError, RuntimeError, AssertionError):
        handle = None  # no CUDA in torch, or a UUID NVML does not know: fall back to the index
    try:
        if handle is None:
            handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except pynvml.NVMLError:
        return None


def rss_bytes() -> tuple[int | None, int | None]:
    """``(peak, current)`` resident set size of this process in bytes.

    The peak (``getrusage``) is the whole process lifetime's and cannot be reset, so it only grows
    from epoch to epoch. The current RSS comes from ``/proc/self/statm`` (Linux; ``None`` elsewhere).
    """
    peak: int | None = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux, bytes on macOS.
    peak = peak if sys.platform == "darwin" else peak * 1024
    current = None
    try:
        with open("/proc/self/statm") as f:
            current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    return peak, current


def device_memory(device: torch.device) -> dict[str, int | None]:
    """Peak/used device memory and host RSS; every key present, ``None`` where not applicable.

    CUDA keys: ``cuda_max_allocated_bytes`` / ``cuda_max_reserved_bytes`` (since the last
    ``torch.cuda.reset_peak_memory_stats``) and ``nvml_used_bytes``; ``None`` on CPU.
    Host keys, always: ``peak_rss_bytes``, ``rss_bytes``.
    """
    peak, current = rss_bytes()
    out: dict[str, int | None] = {
        "cuda_max_allocated_bytes": None, "cuda_max_reserved_bytes": None, "nvml_used_bytes": None,
        "peak_rss_bytes": peak, "rss_bytes": current,
    }
    if device.type == "cuda":
        out["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
        out["cuda_max_reserved_bytes"] = int(torch.cuda.max_memory_reserved(device))
        out["nvml_used_bytes"] = nvml_used_bytes(device.index if device.index is not None else 0)
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def model_memory(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """``param_bytes`` (all parameters), ``grad_bytes`` (those with a ``.grad``), ``optim_state_bytes``
    (every tensor in ``optimizer.state``: momentum, Adam moments, step counters)."""
    params = list({id(p): p for p in model.parameters()}.values())
    state = 0
    if optimizer is not None:
        for s in optimizer.state.values():
            state += sum(_nbytes(v) for v in s.values() if isinstance(v, torch.Tensor))
    return {
        "param_bytes": sum(_nbytes(p) for p in params),
        "grad_bytes": sum(_nbytes(p.grad) for p in params if p.grad is not None),
        "optim_state_bytes": state,
    }


def sync_device(device: torch.device) -> None:
    """Wait for the device (CUDA) so that a host clock or a peak reading sees the work done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

def reset_cuda_peak(device: torch.device) -> None:
    """Start a new CUDA allocator peak (a no-op elsewhere)."""
    if device.type == "cuda":
        sync_device(device)
        torch.cuda.reset_peak_memory_stats(device)


def cuda_peak(device: torch.device) -> int | None:
    """The CUDA allocator's peak since :func:`reset_cuda_peak`; ``None`` off CUDA."""
    if device.type != "cuda":
        return None
    sync_device(device)
    return int(torch.cuda.max_memory_allocated(device))


class MemorySnapshot:
    """``profiler.memory_snapshot`` (CUDA only): record the allocator's history over one step and
    dump it as ``<run dir>/memory_snapshot_epoch<N>.pickle`` (open with https://pytorch.org/memory_viz)."""

    def __init__(self, enabled: bool, device: torch.device, log: Callable[[str], None]) -> None:
        if enabled and device.type != "cuda":
            log("profiler.memory_snapshot is CUDA-only; skipped on " + device.type)
        self.enabled = enabled and device.type == "cuda"
        self.log = log
        self.on = False

    def start(self) -> None:
        """Start recording (once per measured step); a no-op when disabled."""
        if self.enabled and not self.on:
            # clear_history ("clear history when enabling"): each dump holds its own step's events only.
            torch.cuda.memory._record_memory_history(max_entries=200_000, clear_history=True)
            self.on = True

    def dump(self, run_dir: Path | None, epoch: int) -> Path | None:
        """Stop a recording in progress and write it to ``run_dir`` (``None``: drop it); the path
        written, if any."""
        if not self.on:
            return None
        self.on = False
        try:
            if run_dir is None:
                return None
            path = run_dir / f"memory_snapshot_epoch{epoch}.pickle"
            torch.cuda.memory._dump_snapshot(str(path))
            self.log(f"memory snapshot written to {path} (open with https://pytorch.org/memory_viz)")
            return path
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
