"""Recipes that mirror published ones (recipes/published/): each validates here, where only its data are
missing, and runs a few steps of its real model, at its real size, on synthetic data."""

from __future__ import annotations

import pytest
from conftest import ROOT

from framework.recipe.errors import RecipeError
from framework.recipe.resolve import resolve_recipe

PUBLISHED = sorted((ROOT / "recipes" / "published").glob("*.yaml"))
SMALL = ["data.source=synthetic", "data.root=null", "data.synthetic_train_size=8", "data.synthetic_val_size=4",
         "data.batch_size=4", "data.eval_batch_size=4", "data.workers=0", "schedule.epochs=2",
         "schedule.warmup_epochs=0", "backend.precision=fp32"]


@pytest.mark.parametrize("path", PUBLISHED, ids=lambda p: p.stem)
def test_published_recipe_validates_but_for_its_data(path):
    with pytest.raises(RecipeError) as err:
        resolve_recipe(path)
    assert err.value.errors and all(e.startswith("data.root = ") for e in err.value.errors), err.value.errors
    assert "Table" in path.read_text() or "section" in path.read_text()  # the header names its source


@pytest.mark.parametrize("path", PUBLISHED, ids=lambda p: p.stem)
def test_published_recipe_runs_a_few_steps(train_in_process, tmp_path, path):
    s = train_in_process([*SMALL, f"output.dir={tmp_path / 'run'}"], recipe=path)
    assert s["status"] == "completed" and s["averaging"]["updates"] >= 1
    r = resolve_recipe(path, SMALL)
    assert r.averaging.strategy in ("swa", "ema") and (r.mixup.active or r.name == "swa_paper_cifar")
