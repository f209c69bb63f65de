"""Corrupt or unreadable samples (``data.on_corrupt``): one line that stops every rank, or a counted skip.

A data set that reads a file per sample (ImageFolder) is wrapped in :class:`Guarded`. A sample
whose file fails to decode or has gone missing since the index was built is

- ``error`` (default): a :class:`CorruptSample` naming the file, its index, the rank and the knob;
  :class:`Checked` makes every rank raise it at the same step, and the entry point prints it as one
  line with exit 2 (no checkpoint is written after it);
- ``skip``: replaced by the next readable index of the same split, so every rank keeps its batch
  shape and the sample order stays a function of ``(seed, epoch)``: resume stays exact. A warning
  names each bad file once per process.

Counting skips across DataLoader workers: workers are separate processes, so a counter in a worker
never reaches the trainer. Each :class:`Guarded` keeps one flag per index in shared memory instead;
a worker sets it before it returns the batch. The trainer re-derives an epoch's skips from the
sampler's order and those flags (:func:`count_skipped`): exact for any ``num_workers``, and blind to
batches a worker prefetched but the trainer never used.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from distlocal.errors import ConfigError

ON_CORRUPT: tuple[str, ...] = ("error", "skip")
READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # missing file, truncated image, PIL.UnidentifiedImageError
    ValueError, SyntaxError, EOFError,  # PIL's plugins raise these for malformed headers and chunks
    Image.DecompressionBombError,
)
_HINT = "replace or delete the file, or set data.on_corrupt=skip to train on a substitute sample"
_WORKER_LINE = re.compile(r"CorruptSample: (.+)$")
_REPR = re.compile(r"\s*<[^<>]*>")


class CorruptSample(ConfigError):
    """A sample that cannot be read, under ``data.on_corrupt=error``: one line, exit 2.

    A DataLoader worker's exception reaches the main process re-raised as ``type(exc)(text)``, where
    the text is "Caught CorruptSample in DataLoader worker process 0" plus the worker's traceback;
    the constructor keeps the traceback's last line, the original message, so the line survives.
    """

    def __init__(self, message: str) -> None:
        if "Traceback" in message:
            found = _WORKER_LINE.search(message.strip().splitlines()[-1])
            message = found.group(1) if found else message
        super().__init__(message)


def _describe(dataset: Dataset, index: int) -> str:
    """The file behind ``dataset[index]`` (through any ``Subset``), else the index alone."""
    while isinstance(dataset, Subset):
        index, dataset = int(dataset.indices[index]), dataset.dataset
    samples = getattr(dataset, "samples", None)
    return f"'{samples[index][0]}'" if samples is not None else f"#{index}"


class Guarded(Dataset):
    """``dataset`` with ``data.on_corrupt`` applied to samples that raise a read error."""

    def __init__(self, dataset: Dataset, policy: str) -> None:
        if policy not in ON_CORRUPT:
            raise ConfigError(f"data.on_corrupt must be one of {', '.join(ON_CORRUPT)}, got '{policy}'")
        self.dataset, self.policy = dataset, policy
        self.n = len(dataset)  # type: ignore[arg-type]
        # Shared memory: DataLoader workers (fork or spawn) write the flags the trainer reads.
        self.bad = torch.zeros(self.n, dtype=torch.uint8).share_memory_()

    def __len__(self) -> int:
        return self.n

    def __getattr__(self, name: str) -> Any:
        # The wrapped data set's own attributes (classes, targets, samples) read as before. Via
        # __dict__: unpickling in a worker asks for attributes before ``dataset`` is set.
        dataset = self.__dict__.get("dataset")
        if dataset is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(dataset, name)

    def __getitem__(self, index: int) -> Any:
        for offset in range(self.n):
            i = (index + offset) % self.n
            if self.bad[i]:  # known bad: do not pay for the failing read again
                continue
            try:
                return self.dataset[i]
            except READ_ERRORS as exc:
                self._mark(i, exc)
        raise CorruptSample(f"no sample of the {self.n} in this split can be read; check data.root")

    def _mark(self, index: int, exc: BaseException) -> None:
        # PIL's messages repeat the path as "<_io.BufferedReader name='...'>": the line names it once.
        detail = _REPR.sub("", " ".join(str(exc).split())).strip()
        reason = f"{type(exc).__name__}: {detail}"[:160] if detail else type(exc).__name__
        where = f"{_describe(self.dataset, index)} (index {index}, {reason})"
        if self.policy == "error":
            raise CorruptSample(f"cannot read sample {where}") from exc
        self.bad[index] = 1
        print(f"distlocal: warning: skipping unreadable sample {where}; the next readable one "
              "stands in for it (data.on_corrupt=skip)", file=sys.stderr, flush=True)


def guard(dataset: Dataset | None, policy: str) -> Any:
    """``dataset`` wrapped in :class:`Guarded` (``None`` stays ``None``)."""
    return None if dataset is None else Guarded(dataset, policy)


def count_skipped(loader: DataLoader, steps: int) -> int:
    """Samples of this rank's first ``steps`` batches of the current epoch that were substituted.

    The epoch's order is the sampler's (call after ``set_epoch``); a sample is substituted exactly
    when its flag is set, and every batch the trainer used has been read, so its flags are final.
    """
    dataset = loader.dataset
    if not isinstance(dataset, Guarded) or not bool(dataset.bad.any()):
        return 0
    order = list(iter(loader.sampler))[: steps * int(loader.batch_size or 1)]  # type: ignore[arg-type]
    return int(dataset.bad[torch.as_tensor(order, dtype=torch.long)].sum())


class Checked:
    """The batches of ``loader`` with a :class:`CorruptSample` raised on every rank, not one.

    ``lockstep`` (training: every rank takes the same number of batches): after each batch the ranks
    exchange one flag, so all stop at the step where one failed. Otherwise (evaluation: ranks may
    take different numbers of batches) a failing rank stops iterating, and :meth:`finish`, called
    by every rank after its last collective, raises the error everywhere. The exchange runs only
    under ``data.on_corrupt=error`` with several ranks and a file-reading data set.
    """

    def __init__(self, loader: Iterable, env: Any, lockstep: bool) -> None:
        dataset = getattr(loader, "dataset", None)
        self.loader, self.env, self.lockstep = loader, env, lockstep
        self.exchange = bool(env.distributed) and isinstance(dataset, Guarded) and dataset.policy == "error"
        self.error: str | None = None

    def __iter__(self) -> Iterator[Any]:
        batches = iter(self.loader)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except CorruptSample as exc:
                self.error = f"{exc} on rank {self.env.rank}; {_HINT}"
                if not self.exchange:
                    raise CorruptSample(self.error) from None
                if not self.lockstep:
                    return
                batch = None
            if self.lockstep and self.exchange:
                self.finish()
            yield batch

    def finish(self) -> None:
        """Raise the first failing rank's error on every rank (a collective when exchanging)."""
        if self.exchange:
            failed = torch.tensor([0 if self.error is None else 1], dtype=torch.int32)
            if dist.get_backend() == "nccl":
                failed = failed.to(self.env.device)
            dist.all_reduce(failed)
            if int(failed.item()) == 0:
                return
            errors: list[str | None] = [None] * int(self.env.world_size)
            dist.all_gather_object(errors, self.error)
            self.error = next(e for e in errors if e is not None)
        if self.error is not None:
            raise CorruptSample(self.error)
