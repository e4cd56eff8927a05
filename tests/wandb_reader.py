"""Read an offline wandb run file (``run-*.wandb``): LevelDB-style log records of wandb protobufs.

wandb 0.31 ships no Python reader for its transaction log, so tests parse it here to assert on
what was really logged (history rows, config), not on our own JSONL copy.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

_BLOCK = 32768
_HEADER = 7  # ":W&B" + 2-byte magic + 1-byte version


def _records(data: bytes):
    pos, buf = _HEADER, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            yield buf + chunk
            buf = b""


def read_run(run_dir: Path) -> dict:
    """``{"history": [row, ...], "config": {...}, "run_id": str}`` of an offline run folder."""
    path = next(Path(run_dir).glob("run-*.wandb"))
    out = {"history": [], "config": {}, "run_id": None, "group": None}
    assert path.read_bytes()[:4] == b":W&B"
    for data in _records(path.read_bytes()):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            out["history"].append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            )
        elif kind == "run":
            out["run_id"] = rec.run.run_id
            out["group"] = rec.run.run_group or None
            out["config"].update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
    return out
