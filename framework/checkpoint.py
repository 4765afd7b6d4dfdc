"""Checkpoints: atomic, checksummed, and loaded without ever unpickling.

Layout: `<output.dir>/checkpoints/step-<N>/rank<r>.safetensors` (every tensor of that process's
state) + `rank<r>.json` (everything else, as plain data that points at the tensors by name) +
`manifest.json` (sha256 and size of every file), written last. All processes write into
`.tmp-step-<N>/`; after a barrier the main process checksums, writes the manifest, fsyncs and
renames the folder into place, then prunes complete checkpoints beyond `checkpoint.keep`, so the
previous one is never deleted before the next is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

MANIFEST = "manifest.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")


class CheckpointError(RuntimeError):
    pass


def encode(obj, tensors: dict, path: str = "s"):
    """Plain JSON data with tensors moved into `tensors` (by name); tuples and non-str keys survive."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__dict__": [[encode(k, tensors, f"{path}.k{i}"), encode(v, tensors, f"{path}.{i}")]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        items = [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if hasattr(obj, "tolist") and not isinstance(obj, (int, float, bool)):  # numpy arrays and scalars
        return {"__array__": obj.tolist(), "dtype": str(obj.dtype)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"cannot checkpoint a {type(obj).__name__} at {path}: only tensors and plain data")


def decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {decode(k, tensors): decode(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(decode(v, tensors) for v in obj["__tuple__"])
        if "__array__" in obj:
            import numpy as np

            return np.asarray(obj["__array__"], dtype=obj["dtype"])
        raise CheckpointError(f"unexpected mapping in checkpoint data: keys {sorted(obj)[:5]}")
    return obj


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(root: Path, step: int, state: dict, rank: int, world_size: int, keep: int, meta: dict,
                    write_extra=None) -> Path:
    """Collective: every process calls it with its own `state`; `write_extra(folder)` (every process)
    adds files of its own, which the manifest covers too. Returns the final folder."""
    from safetensors.torch import save_file

    tag = f"step-{step:09d}"
    tmp, final = root / f".tmp-{tag}", root / tag
    if rank == 0:
        if tmp.is_symlink():  # never follow a planted link
            tmp.unlink()
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    tensors: dict = {}
    plain = encode(state, tensors)
    save_file(tensors, str(tmp / f"rank{rank}.safetensors"))
    with open(tmp / f"rank{rank}.safetensors", "rb") as f:
        os.fsync(f.fileno())
    _fsync_write(tmp / f"rank{rank}.json", json.dumps(plain).encode())
    if write_extra is not None:
        write_extra(tmp)
    _barrier()
    if rank == 0:
        files = {str(p.relative_to(tmp)): {"sha256": _sha256(p), "bytes": p.stat().st_size}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {"step": step, "world_size": world_size, "files": files, **meta}
        _fsync_write(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fd = os.open(root, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        for old in [c for c in _checkpoints(root) if (c / MANIFEST).is_file()][:-keep]:  # no re-hashing here
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def check_checkpoint(path: Path) -> str | None:
    """None when complete and intact, else why not."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return "no manifest (incomplete)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as err:
        return f"unreadable manifest ({err})"
    for name, info in files.items():
        f = path / name
        if not f.is_file() or f.stat().st_size != info["bytes"] or _sha256(f) != info["sha256"]:
            return f"{name} is missing or does not match its checksum (corrupt)"
    return None


def _checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders, oldest first."""
    return sorted(p for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []


def newest_intact_checkpoint(root: Path) -> Path | None:
    """Checked newest first, so only what is skipped (with a message) and the one chosen are hashed."""
    for path in reversed(_checkpoints(root)):
        problem = check_checkpoint(path)
        if problem is None:
            return path
        print(f"note: skipping checkpoint {path}: {problem}", flush=True)
    return None


def resolve_resume(resume: str, root: Path) -> Path | None:
    if resume == "never":
        return None
    if resume == "auto":
        return newest_intact_checkpoint(root)
    path = Path(resume)
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(f"resume = {resume!r}: refusing a pickle file (loading it could run code); "
                              "give a checkpoint folder written by this framework")
    problem = check_checkpoint(path) if path.is_dir() else "not found"
    if problem:
        raise CheckpointError(f"resume = {resume!r}: {problem}")
    return path


def checkpoint_world_size(path: Path) -> int:
    return json.loads((path / MANIFEST).read_text())["world_size"]


def load_rank_state(path: Path, rank: int) -> dict:
    """This process's state (rank 0's when the checkpoint had fewer processes). Plain data and tensors only."""
    from safetensors.torch import load_file

    for f in path.iterdir():
        if f.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"{f}: refusing to load a pickle from a checkpoint (it could run code)")
    r = rank if rank < checkpoint_world_size(path) else 0
    tensors = load_file(str(path / f"rank{r}.safetensors"))
    return decode(json.loads((path / f"rank{r}.json").read_text()), tensors)
