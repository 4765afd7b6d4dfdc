"""Every write of a run stays under `output.dir`: no path traversal, no symlink escape.

The names a run writes are fixed here. Before anything is written, a name that is already a
symbolic link (it would carry the write elsewhere) is refused, and so is a recipe name that
would climb out of a `${name}` output folder. Temporary files are created exclusively
(`mkstemp`), so a link planted under the temporary name is never followed either.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

RUN_FILES = ("recipe.yaml", "metrics.jsonl", "summary.json", "model_online.safetensors", "model_averaged.safetensors",
             "model_best.safetensors", "model_best.json", "model_online", "model_averaged", "model_best", "checkpoints",
             "wandb", ".lock")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")  # what a sweep or a file stem gives, and nothing that climbs


def check_run_name(name: str, errors: list[str]) -> None:
    if not SAFE_NAME.match(name):
        errors.append(f"name = {name!r}: letters, digits and . _ + = - only, starting with a letter or digit "
                      "(it becomes part of output.dir)")


def check_output_dir(out: Path, errors: list[str]) -> None:
    if out.exists() and not out.is_dir():
        errors.append(f"output.dir = {str(out)!r}: exists and is not a folder")
        return
    named = [p.name for p in out.glob("model_averaged-*")] if out.is_dir() else []  # several averagers
    for name in (*RUN_FILES, *named):
        path = out / name
        if path.is_symlink():
            errors.append(f"output.dir = {str(out)!r}: {name} is a symbolic link (to {os.readlink(path)}); "
                          "a run writes only inside output.dir, so remove the link")
    checkpoints = out / "checkpoints"
    if checkpoints.is_dir() and not checkpoints.is_symlink():
        for entry in sorted(checkpoints.iterdir()):
            if entry.is_symlink():
                errors.append(f"output.dir = {str(out)!r}: checkpoints/{entry.name} is a symbolic link; "
                              "checkpoints are read and pruned only inside output.dir, so remove the link")


def temp_beside(path: Path) -> Path:
    """A new, exclusively created file next to `path`, for writing then renaming over it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def redirect_tool_dirs(out: Path) -> None:
    """wandb keeps debug logs, an artifact staging area and a cache under the home folder; a run's
    go under its own wandb folder instead (unless the user chose a place for them)."""
    for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"), ("WANDB_ARTIFACT_DIR", "artifacts")):
        os.environ.setdefault(var, str(out / "wandb" / sub))
