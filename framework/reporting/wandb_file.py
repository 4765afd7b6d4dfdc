"""Read an offline wandb run file (`run-<id>.wandb`) back: config, history, summary.

wandb 0.31 has no Python reader and no `wandb sync --view`; the file is a LevelDB-style
log of `wandb.proto` Record messages: a 7-byte header, then 32 KiB blocks of chunks
(crc32 4 bytes, length 2 bytes little-endian, type 1 byte: full/first/middle/last).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

HEADER = b":W&B"
HEADER_LEN = 7
BLOCK = 32 * 1024
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if not data.startswith(HEADER):
        raise ValueError(f"{path}: not a wandb run file")
    pos, pending = HEADER_LEN, b""
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_HEADER:  # block trailer padding
            pos += left_in_block
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        if length == 0 and kind == 0:  # zero padding at the end of a block
            pos += left_in_block
            continue
        payload = data[pos + CHUNK_HEADER: pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind in (FULL, FIRST):
            pending = payload
        else:
            pending += payload
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


@dataclass
class OfflineRun:
    run_id: str = ""
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def _key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def read_run(path: Path) -> OfflineRun:
    run = OfflineRun()
    for record in iter_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id = record.run.run_id
            for item in record.run.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            run.history.append({_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_key(item)] = json.loads(item.value_json)
    # wandb wraps every config value as {"value": ...}
    run.config = {k: v["value"] if isinstance(v, dict) and set(v) == {"value"} else v for k, v in run.config.items()
                  if not k.startswith("_")}
    return run


def find_run_files(out_dir: Path) -> list[Path]:
    return sorted(Path(out_dir).glob("wandb/*run-*/run-*.wandb"))
