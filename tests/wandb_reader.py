"""Read the history rows back from an offline wandb run's ``.wandb`` file (tests only).

The file is wandb's record log: a 7-byte header (``:W&B``, magic 0xBEE1, version), then 32 KiB
blocks of LevelDB-log records (crc32, length, type FULL/FIRST/MIDDLE/LAST), each payload a
serialised ``wandb_internal_pb2.Record``. wandb no longer ships a Python reader for it.
"""

from __future__ import annotations

import json
import struct
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
        if length == 0 and kind == 0:
            break
        parts += data[pos : pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST: one record complete
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(parts)
            out.append(rec)
            parts = b""
    return out


def history(run_dir: Path) -> list[dict]:
    """The logged history rows of the single offline run under ``<run_dir>/wandb``."""
    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    rows = []
    for rec in records(log):
        if rec.WhichOneof("record_type") == "history":
            rows.append(
                {(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in rec.history.item}
            )
    return rows
