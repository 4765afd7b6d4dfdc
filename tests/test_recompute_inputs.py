"""`bn.recompute_inputs`: which images the recompute pass normalises (framework/bn/inputs.py)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import ROOT

from framework.recipe.errors import RecipeError
from framework.recipe.resolve import resolve_recipe

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
MIX = ["mixup.mixup_alpha=0.8", "mixup.cutmix_alpha=1.0", "loss.name=soft_ce", "model.name=test_resnet"]


def _first_batch(make):
    random.seed(0)  # the train transform draws from the process's streams (workers=0): the same crops each time
    torch.manual_seed(0)
    return next(iter(make()))


def _pass_inputs(kind: str, epoch: int = 0, extra=()):
    from framework.bn.inputs import create_pass_inputs
    from framework.data.loaders import create_datasets, create_loaders
    from framework.training.models import create_model

    r = resolve_recipe(QUICKSTART, [*MIX, f"bn.recompute_inputs={kind}", *extra])
    model = create_model(r.model, r.data.image_size)[0]
    train, val = create_datasets(r.data, model, 10, 3, r.seed)
    loaders = create_loaders(r.data, train, val, 0, 1, r.seed, pin_memory=False)
    return create_pass_inputs(r, model, loaders.train, lambda: epoch, 0, 1, pin_memory=False), loaders


def test_each_kind_gives_its_own_images_and_passes_repeat():
    train_make, loaders = _pass_inputs("train")
    images, targets = _first_batch(train_make)
    assert targets.dtype == torch.int64  # unmixed, hard labels

    mixed_make, _ = _pass_inputs("mixed")
    outer = np.random.get_state()
    (a, ta), (b, tb) = _first_batch(mixed_make), _first_batch(mixed_make)
    assert np.array_equal(np.random.get_state()[1], outer[1])  # the process's NumPy stream is untouched
    assert torch.equal(a, b) and torch.equal(ta, tb)  # each pass restarts its own stream: the same mixes
    assert ta.shape == (32, 10) and (ta.max(1).values < 0.99).any()  # soft targets: mixed
    off_make, _ = _pass_inputs("mixed", epoch=3, extra=["mixup.off_epoch=3"])
    assert (_first_batch(off_make)[1].max(1).values > 0.99).all()  # training no longer mixes: neither does the pass

    eval_make, _ = _pass_inputs("eval")
    (e1, _), (e2, _) = _first_batch(eval_make), _first_batch(eval_make)
    assert torch.equal(e1, e2)
    # the eval transform (whole image, no crop): the same pixels as the validation pipeline gives a training image
    from framework.data.loaders import create_datasets
    from framework.training.models import create_model

    r = resolve_recipe(QUICKSTART, [*MIX, "bn.recompute_inputs=eval"])
    clean = create_datasets(r.data, create_model(r.model, 32)[0], 10, 3, r.seed, train_transform="eval")[0]
    pool = torch.stack([clean[i][0] for i in range(len(clean))])
    assert all((pool - x).abs().flatten(1).amax(1).min() < 1e-6 for x in e1[:4])
    assert not all((pool - x).abs().flatten(1).amax(1).min() < 1e-6 for x in images[:4])  # train: cropped


def test_mixed_needs_mixing():
    with pytest.raises(RecipeError) as err:
        resolve_recipe(QUICKSTART, ["bn.recompute_inputs=mixed"])
    assert "bn.recompute_inputs = 'mixed': training mixes nothing" in "\n".join(err.value.errors)


def test_the_inputs_change_only_the_averaged_statistics_never_training(train_in_process, tmp_path):
    """Same seed, three kinds of pass: bitwise the same live weights; the averaged weights' statistics differ."""
    from safetensors.torch import load_file

    runs = {}
    for kind in ("train", "mixed", "eval"):
        out = tmp_path / kind
        summary = train_in_process([*MIX, "schedule.epochs=2", "averaging.start_epoch=1", "bn.recompute_batches=8",
                                    f"bn.recompute_inputs={kind}", f"output.dir={out}"])
        runs[kind] = (load_file(out / "model_online.safetensors"), load_file(out / "model_averaged.safetensors"), summary)
    live, averaged, _ = runs["train"]
    for kind in ("mixed", "eval"):
        assert all(torch.equal(live[k], runs[kind][0][k]) for k in live)
        weights = [k for k in averaged if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        assert all(torch.equal(averaged[k], runs[kind][1][k]) for k in weights)
        assert not torch.equal(averaged["bn1.running_var"], runs[kind][1]["bn1.running_var"])
