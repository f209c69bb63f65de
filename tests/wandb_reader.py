"""Read the history rows back from an offline wandb run's ``.wandb`` file (tests only).

The file is wandb's record log: a 7-byte header (``:W&B``, magic 0xBEE1, version), then 32 KiB
blocks of LevelDB-log records (crc32, length, type FULL/FIRST/MIDDLE/LAST), each payload a
serialised ``wandb_internal_pb2.Record``. wandb no longer ships a Python reader for it.

``run.finish()`` can return before wandb's service process has flushed the log: once, under
load, the test read the file right after ``train`` returned and found no records at all (seen
again while fixing it: 0 records on one read, all of them on the next, same run). So the readers
wait, bounded, for the log to hold its ``exit`` record (written last, by ``finish``) instead of
trusting the file at first sight, and a record cut off at the end of the file ends the read.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

_BLOCK = 32768
_HEADER = struct.Struct("<IHB")


def records(path: Path) -> list[wandb_internal_pb2.Record]:
    """Every record of a ``.wandb`` file, in order."""
    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, "not a wandb record log"
    out, pos, parts = [], 7, b""
    while pos + _HEADER.size <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _HEADER.size:  # block trailer: padding
            pos += left_in_block
            continue
        _crc, length, kind = _HEADER.unpack_from(data, pos)
        pos += _HEADER.size
        if (length == 0 and kind == 0) or pos + length > len(data):
            break  # zero padding, or a record still being written
        parts += data[pos : pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST: one record complete
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(parts)
            out.append(rec)
            parts = b""
    return out


def finished_log(run_dir: Path, timeout_s: float = 60.0) -> tuple[Path, list]:
    """The single offline run's ``.wandb`` file under ``<run_dir>/wandb`` and its records, once they
    end with the ``exit`` record; polls every 0.1 s and fails after ``timeout_s`` saying what it saw."""
    deadline = time.monotonic() + timeout_s
    seen = "no .wandb file"
    while True:
        logs = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
        if len(logs) == 1:
            recs = records(logs[0])
            if any(r.WhichOneof("record_type") == "exit" for r in recs):
                return logs[0], recs
            seen = f"{len(recs)} records, no exit record yet"
        elif logs:
            seen = f"{len(logs)} .wandb files"
        if time.monotonic() > deadline:
            raise AssertionError(f"wandb log under {run_dir} not finished after {timeout_s:.0f} s: {seen}")
        time.sleep(0.1)


def history(run_dir: Path) -> list[dict]:
    """The logged history rows of the single offline run under ``<run_dir>/wandb``."""
    _, recs = finished_log(run_dir)
    rows = []
    for rec in recs:
        if rec.WhichOneof("record_type") == "history":
            rows.append(
                {(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in rec.history.item}
            )
    return rows
