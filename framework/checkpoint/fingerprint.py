"""What a checkpoint was written for, so `resume` is checked before any process starts.

The manifest records the recipe values a checkpoint's tensors depend on (the model and its head, the
engine that shaped the optimizer state, the averagers by name). At validation, `resume = <folder>`
must name a complete, intact checkpoint whose values match the recipe; `resume = auto` checks the
newest checkpoint in output.dir the same way (its checksums are verified by the run, which loads it).
Checkpoints written before the manifest held these values are checked for completeness only.
"""

from __future__ import annotations

import json
from pathlib import Path

from framework.recipe.schema import Recipe, averager_name, averagers_of


def recipe_fingerprint(recipe: Recipe) -> dict:
    """Recipe values, by key, that a checkpoint cannot be loaded without."""
    return {"model.name": recipe.model.name, "model.num_classes": recipe.model.num_classes,
            "model.in_chans": recipe.model.in_chans, "backend.type": recipe.backend.type,
            "backend.zero_stage": recipe.backend.zero_stage,
            "averaging": [averager_name(a) for a in averagers_of(recipe.averaging)]}


def _mismatches(manifest: dict, recipe: Recipe) -> list[str]:
    saved = manifest.get("recipe", {})
    return [f"{key} = {value!r} in the recipe, {saved[key]!r} in the checkpoint"
            for key, value in recipe_fingerprint(recipe).items() if key in saved and saved[key] != value]


def check_resume(recipe: Recipe, errors: list[str]) -> None:
    from framework.checkpoint.store import MANIFEST, CheckpointError, resolve_resume

    if recipe.resume == "never":
        return
    if recipe.resume == "auto":
        root = Path(recipe.output.dir) / "checkpoints"
        found = sorted(p for p in root.glob("epoch-*/" + MANIFEST)) if root.is_dir() else []
        path, key = (found[-1].parent if found else None), "output.dir"
    else:
        try:
            path, key = resolve_resume(recipe.resume, Path()), "resume"
        except CheckpointError as err:
            errors.append(f"{err}; give a checkpoint folder (output.dir/checkpoints/epoch-...), auto or never")
            return
    if path is None:
        return
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        errors.append(f"{key} = {str(path)!r}: unreadable checkpoint manifest ({err})")
        return
    if problems := _mismatches(manifest, recipe):
        given = recipe.resume if key == "resume" else recipe.output.dir
        errors.append(f"{key} = {given!r}: checkpoint {path.name} "
                      f"was written by another recipe ({'; '.join(problems)}); "
                      + ("give this recipe its own output.dir" if key == "output.dir" else "resume=never starts afresh"))
