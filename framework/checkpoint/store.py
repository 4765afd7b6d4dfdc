"""Checkpoints: atomic, checksummed, and loaded without ever unpickling.

Layout: `<output.dir>/checkpoints/epoch-<E>-sample-<S>/` (named by training progress, which does
not depend on the world size, so names never go backwards after a resume with more processes):
`shared.safetensors` + `shared.json`, the state every process holds alike (replicated weights,
optimizer, averaged copy, schedule), written once by the main process; `rank<r>.safetensors` +
`rank<r>.json`, what is that process's own (random streams, sampler position, BN statistics,
ZeRO partitions); `manifest.json` (sha256 and size of every file), written last. JSON files hold
plain data that points at the tensors by name. All processes write into `.tmp-<tag>/`; after a
barrier the main process checksums, writes the manifest, fsyncs and renames the folder into place,
then prunes complete checkpoints beyond `checkpoint.keep`, so the previous one is never deleted
before the next is complete. A write that fails (a full disk) on any process removes the partial
folder on every process's word and raises `CheckpointWriteError`; older checkpoints are untouched.
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


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (every process raises it, with the same one-line message)."""


def checkpoint_tag(epoch: int, samples_in_epoch: int) -> str:
    """Folder name: epochs done and samples of the next epoch seen, by every process together."""
    return f"epoch-{epoch:05d}-sample-{samples_in_epoch:09d}"


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


def _first_error(error: str | None) -> str | None:
    """Collective: the first process's error, seen by every process (so all stop, or none)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return error
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)


def _write_part(folder: Path, name: str, state: dict) -> None:
    from safetensors.torch import save_file

    tensors: dict = {}
    plain = encode(state, tensors)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    with open(folder / f"{name}.safetensors", "rb") as f:
        os.fsync(f.fileno())
    _fsync_write(folder / f"{name}.json", json.dumps(plain).encode())


def save_checkpoint(root: Path, tag: str, state: dict, rank: int, world_size: int, keep: int, meta: dict,
                    shared: dict | None = None, write_extra=None) -> Path:
    """Collective: every process calls it with its own `state`; the main process also with `shared`.
    `write_extra(folder)` (every process) adds files of its own, which the manifest covers too.
    Returns the final folder."""
    from safetensors import SafetensorError  # its writer reports a full disk as this, not as OSError

    tmp, final = root / f".tmp-{tag}", root / tag
    error = None
    if rank == 0:
        try:
            if tmp.is_symlink():  # never follow a planted link
                tmp.unlink()
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as err:
            error = f"{type(err).__name__}: {err}"
    if (error := _first_error(error)) is None:
        try:
            if rank == 0 and shared is not None:
                _write_part(tmp, "shared", shared)
            _write_part(tmp, f"rank{rank}", state)
            if write_extra is not None:
                write_extra(tmp)
        except (OSError, SafetensorError) as err:
            error = f"rank {rank}: {type(err).__name__}: {err}"
        error = _first_error(error)
    if error is None and rank == 0:
        try:
            files = {str(p.relative_to(tmp)): {"sha256": _sha256(p), "bytes": p.stat().st_size}
                     for p in sorted(tmp.rglob("*")) if p.is_file()}
            manifest = {"tag": tag, "world_size": world_size, "files": files, **meta}
            _fsync_write(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            fd = os.open(root, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        except OSError as err:
            error = f"{type(err).__name__}: {err}"
    if (error := _first_error(error)) is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            intact = newest_intact_checkpoint(root)
        raise CheckpointWriteError(f"checkpoint {final} could not be written ({error}); removed the partial folder; "
                                   f"newest intact checkpoint: {intact if rank == 0 else 'see the main process'}")
    if rank == 0:
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
    return sorted(p for p in root.glob("epoch-*") if p.is_dir()) if root.is_dir() else []


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


def _merge(shared: dict, own: dict) -> dict:
    """One process's state: `own` over `shared`; mappings both hold (the model: replicated weights,
    own BN statistics) are merged key by key."""
    merged = dict(shared)
    for key, value in own.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = {**merged[key], **value} if both else value
    return merged


def _read_part(path: Path, name: str) -> dict:
    from safetensors.torch import load_file

    tensors = load_file(str(path / f"{name}.safetensors"))
    return decode(json.loads((path / f"{name}.json").read_text()), tensors)


def load_rank_state(path: Path, rank: int) -> dict:
    """This process's state (rank 0's when the checkpoint had fewer processes). Plain data and tensors only."""
    for f in path.iterdir():
        if f.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"{f}: refusing to load a pickle from a checkpoint (it could run code)")
    r = rank if rank < checkpoint_world_size(path) else 0
    shared = _read_part(path, "shared") if (path / "shared.json").is_file() else {}
    return _merge(shared, _read_part(path, f"rank{r}"))
