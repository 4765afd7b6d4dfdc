"""Model, data and schedule options: what the recipe says reaches the objects, and what cannot run is refused
at validation with a line naming the key (in-process, no training)."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT

from framework.recipe.errors import RecipeError
from framework.recipe.resolve import resolve_recipe

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def _errors(overrides: list[str], recipe=QUICKSTART) -> str:
    with pytest.raises(RecipeError) as err:
        resolve_recipe(recipe, overrides)
    return "\n".join(err.value.errors)


# ---- model: image size, keywords, BN settings -------------------------------------------------------

def test_image_size_builds_the_model_for_it():
    from framework.training.models import create_model

    r = resolve_recipe(QUICKSTART, ["model.name=test_coatnet", "data.image_size=64"])
    model, _ = create_model(r.model, r.data.image_size)
    assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 10)  # built for 160 px it failed in attention


@pytest.mark.parametrize("model,size,needs", [("test_vit", 40, "needs a multiple of its patch size 16 (e.g. 32 or 48)"),
                                              ("test_coatnet", 48, "sizes it takes nearby: 32, 64")])
def test_a_size_the_model_cannot_take_is_refused(model, size, needs):
    text = _errors([f"model.name={model}", f"data.image_size={size}"])
    assert f"data.image_size = {size}: {model}" in text and needs in text


def test_model_kwargs_reach_timm_and_unknown_ones_are_named():
    from framework.training.models import create_model

    r = resolve_recipe(QUICKSTART, ["model.name=test_resnet", "model.kwargs.global_pool=max", "model.kwargs.drop_block_rate=0.1"])
    model, _ = create_model(r.model, r.data.image_size)
    assert model.global_pool.pool_type == "max"
    text = _errors(["model.name=test_resnet", "model.kwargs.drop_blok_rate=0.1"])
    assert "model.kwargs.drop_blok_rate = 0.1: not a keyword of timm.create_model('test_resnet')" in text


def test_bn_momentum_and_eps_set_every_bn_layer_and_need_one():
    from framework.training.models import create_model

    r = resolve_recipe(QUICKSTART, ["model.name=test_efficientnet", "model.bn_momentum=0.01", "model.bn_eps=0.001"])
    model, _ = create_model(r.model, r.data.image_size)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(m.momentum == 0.01 and m.eps == 0.001 for m in bns)
    assert "model.bn_momentum = 0.01: test_vit has no BatchNorm layer to set" in _errors(["model.name=test_vit", "model.bn_momentum=0.01"])


# ---- pretrained weights ------------------------------------------------------------------------------

def test_pretrained_file_keeps_the_classifier_when_its_shape_fits(tmp_path):
    """The defect: timm's load_pretrained drops the classifier whenever num_classes differs from its config's (1000)."""
    import timm
    from safetensors.torch import save_file

    from framework.training.models import create_model

    source = timm.create_model("test_resnet", num_classes=10)
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    r = resolve_recipe(QUICKSTART, ["model.name=test_resnet", f"model.pretrained_file={tmp_path / 'w.safetensors'}"])
    model, notes = create_model(r.model, r.data.image_size)
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert "kept" in notes[0] and not any("dropped" in n for n in notes)


def test_pretrained_file_drops_only_what_does_not_fit_and_says_so(tmp_path):
    import timm
    from safetensors.torch import save_file

    from framework.training.models import create_model

    source = timm.create_model("test_resnet", num_classes=1000)
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    r = resolve_recipe(QUICKSTART, ["model.name=test_resnet", f"model.pretrained_file={tmp_path / 'w.safetensors'}"])
    model, notes = create_model(r.model, r.data.image_size)
    text = "\n".join(notes)
    assert "dropped" in text and "fc.weight (1000," in text and "left as initialised: fc.weight, fc.bias" in text
    assert torch.equal(model.conv1[0].weight if isinstance(model.conv1, torch.nn.Sequential) else model.conv1.weight,
                       source.conv1[0].weight if isinstance(source.conv1, torch.nn.Sequential) else source.conv1.weight)


def test_pretrained_vit_at_another_size_keeps_its_position_embedding(tmp_path):
    """timm's checkpoint filter resamples pos_embed to the size the model is built for; shape matching alone would drop it."""
    import timm
    from safetensors.torch import save_file

    from framework.training.models import create_model

    source = timm.create_model("test_vit", num_classes=10, img_size=32)
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    r = resolve_recipe(QUICKSTART, ["model.name=test_vit", "data.image_size=48", f"model.pretrained_file={tmp_path / 'w.safetensors'}"])
    model, notes = create_model(r.model, r.data.image_size)
    assert model.pos_embed.shape == (1, 10, 64) and "pos_embed" not in "\n".join(notes)
    assert torch.equal(model.head.weight, source.head.weight)


def _fake_hf_cache(root, repo: str, state: dict) -> None:
    from safetensors.torch import save_file

    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "snapshots" / "abc123").mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("abc123")
    save_file(state, str(folder / "snapshots" / "abc123" / "model.safetensors"))


def test_pretrained_true_reads_the_local_hub_cache_only(tmp_path, monkeypatch):
    import huggingface_hub.constants
    import timm

    from framework.training.models import create_model

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    text = _errors(["model.name=resnet18", "model.pretrained=true"])
    assert "model.pretrained = True: no weights for 'resnet18' in the local Hugging Face cache (timm/resnet18.a1_in1k)" in text
    source = timm.create_model("resnet18", num_classes=1000)
    _fake_hf_cache(tmp_path, "timm/resnet18.a1_in1k", source.state_dict())
    r = resolve_recipe(QUICKSTART, ["model.name=resnet18", "model.pretrained=true"])
    model, notes = create_model(r.model, r.data.image_size)
    assert torch.equal(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight) and "fc.weight" in notes[-1]


def test_pretrained_config_gives_interpolation_and_crop_unless_the_recipe_does():
    import timm

    from framework.data.loaders import resolve_pipeline

    r = resolve_recipe(QUICKSTART)
    model = timm.create_model("resnet18", num_classes=10)  # its config: bicubic, crop 0.95
    assert (resolve_pipeline(r.data, model, pretrained=True).interpolation, resolve_pipeline(r.data, model, True).crop_pct) == ("bicubic", 0.95)
    assert (resolve_pipeline(r.data, model, False).interpolation, resolve_pipeline(r.data, model, False).crop_pct) == ("bilinear", 1.0)
    r = resolve_recipe(QUICKSTART, ["data.interpolation=nearest", "data.crop_pct=0.5"])
    assert (resolve_pipeline(r.data, model, True).interpolation, resolve_pipeline(r.data, model, True).crop_pct) == ("nearest", 0.5)


# ---- schedules, averaging start, optimizers -----------------------------------------------------------

def _lrs(overrides: list[str], epochs: int, metric=None) -> list[float]:
    from framework.training.builders import create_scheduler

    r = resolve_recipe(QUICKSTART, [f"schedule.epochs={epochs}", "schedule.warmup_epochs=0", *overrides])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=r.optimizer.lr)
    sched, updates, lrs = create_scheduler(r.schedule, opt, 3), 0, []
    for epoch in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        for _ in range(3):
            updates += 1
            sched.step_update(num_updates=updates)
        sched.step(epoch + 1, metric(epoch) if metric else 0.0)
    return lrs


def test_multistep_decays_at_the_recipes_milestones():
    lrs = _lrs(["schedule.name=multistep", "schedule.decay_milestones=[2, 4]"], 6)  # timm's default: 90, 180, 270
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert "schedule.decay_milestones = None: schedule.name = 'multistep' needs" in _errors(["schedule.name=multistep"])
    assert "expected increasing epochs" in _errors(["schedule.name=multistep", "schedule.decay_milestones=[9]"])


def test_plateau_steps_per_epoch_on_the_named_metric_and_its_counters_survive_a_checkpoint():
    from framework.training.builders import create_scheduler, load_scheduler_state_dict, scheduler_state_dict

    # top-1 stops improving after epoch 1; patience 1: the decay comes two epochs later
    lrs = _lrs(["schedule.name=plateau", "schedule.patience_epochs=1"], 5, metric=lambda e: 50.0)
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.01])
    r = resolve_recipe(QUICKSTART, ["schedule.name=plateau", "schedule.patience_epochs=3", "schedule.warmup_epochs=0"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    a = create_scheduler(r.schedule, opt, 3)
    for epoch, metric in enumerate([50.0, 40.0, 40.0]):
        a.step(epoch + 1, metric)
    import json

    b = create_scheduler(r.schedule, opt, 3)
    load_scheduler_state_dict(b, json.loads(json.dumps(scheduler_state_dict(a))))  # checkpoints hold JSON
    assert b.lr_scheduler.num_bad_epochs == a.lr_scheduler.num_bad_epochs == 2


def test_averaging_that_cannot_start_is_refused():
    text = _errors(["averaging.strategy=swa", "averaging.start_epoch=8", "schedule.epochs=8"])
    assert "averaging.start_epoch = 8: averaging would never start; must be < schedule.epochs (8)" in text


def test_every_optimizer_validation_accepts_takes_a_step():
    """Each timm optimizer is refused by name at validation, or builds and steps on a BN model here."""
    import timm
    import timm.optim
    import torch.nn.functional as F

    from framework.training.builders import create_optimizer

    refused = {}
    for name in timm.optim.list_optimizers():
        try:
            r = resolve_recipe(QUICKSTART, [f"optimizer.name={name}", "optimizer.lr=0.01", "model.name=test_resnet"])
        except RecipeError as err:
            refused[name] = err.errors[0]
            continue
        model = timm.create_model("test_resnet", num_classes=10)
        opt = create_optimizer(r.optimizer, model, r.data.batch_size)
        F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.arange(4)).backward()
        opt.step()
        assert all(torch.isfinite(p).all() for p in model.parameters()), name
    assert "create_graph=True" in refused["adahessian"]
    assert all(text.startswith(f"optimizer.name = {name!r}: not supported: ") for name, text in refused.items())
    assert len(refused) < 25  # bitsandbytes, apex, kron, adahessian on this CPU machine


# ---- folder datasets: one class numbering -------------------------------------------------------------

def _folder(root, splits: dict[str, list[str]]):
    from PIL import Image

    for split, classes in splits.items():
        for c in classes:
            (root / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8), color=(10 * len(c), 0, 0)).save(root / split / c / "a.png")
    return root


def test_a_validation_split_lacking_a_class_keeps_the_training_numbering(tmp_path):
    """The defect: timm numbered val's folders on their own, so 'cat, fish' became 0, 1 instead of 0, 2."""
    from framework.data.loaders import create_datasets

    root = _folder(tmp_path / "d", {"train": ["cat", "dog", "fish"], "val": ["cat", "fish"]})
    r = resolve_recipe(QUICKSTART, ["data.source=folder", f"data.root={root}", "model.num_classes=3", "data.batch_size=1"])
    _, val = create_datasets(r.data, None, 3, 3, 0)
    assert sorted(t for _, t in val) == [0, 2]


def test_classes_outside_the_class_map_are_refused(tmp_path):
    root = _folder(tmp_path / "d", {"train": ["cat", "dog"], "val": ["cat", "emu"]})
    text = _errors(["data.source=folder", f"data.root={root}", "model.num_classes=3"])
    assert "data.val_split = 'val': classes emu are not in the training split" in text
    (tmp_path / "classes.txt").write_text("dog\ncat\nemu\n")
    r = resolve_recipe(QUICKSTART, ["data.source=folder", f"data.root={root}", "model.num_classes=3",
                                    f"data.class_map={tmp_path / 'classes.txt'}", "data.batch_size=1"])
    from framework.data.loaders import create_datasets

    train, val = create_datasets(r.data, None, 3, 3, 0)
    assert sorted(t for _, t in train) == [0, 1] and sorted(t for _, t in val) == [1, 2]
    assert "model.num_classes = 1: the data has 3 classes" in _errors(
        ["data.source=folder", f"data.root={root}", "model.num_classes=1", f"data.class_map={tmp_path / 'classes.txt'}"])


# ---- the front door's process and thread counts ----------------------------------------------------------

def test_front_door_gives_each_cpu_process_its_share_of_cores():
    from framework.distributed.launcher import resolve_launch

    assert resolve_launch("1", 0, 2, {})[1]["OMP_NUM_THREADS"] == "2"  # torch elastic would give 1
    assert resolve_launch("2", 0, 2, {})[1]["OMP_NUM_THREADS"] == "1"
    assert resolve_launch(None, 0, 8, {})[0] == 2  # accelerate_config.yaml's count on CPU
    assert resolve_launch(None, 4, 64, {}) == (4, {})  # one per GPU; threads left to the launcher
    assert resolve_launch("1", 0, 8, {"OMP_NUM_THREADS": "3"})[1]["OMP_NUM_THREADS"] == "3"  # the user's wins
    with pytest.raises(ValueError, match="--num-processes = '0': expected a positive integer"):
        resolve_launch("0", 0, 2, {})

    with pytest.raises(ValueError, match="--num-processes = '0': expected a positive integer"):
        resolve_launch("0", 0, 2, {})


def test_each_process_draws_from_its_own_streams_and_a_seed_repeats_them():
    """The defect: every process ran on the seed alone, so dropout, drop-path and main-process augmentation
    drew identically on every rank."""
    import random

    import numpy as np

    from framework.data.sampling import seed_process_streams

    def draws(rank: int):
        seed_process_streams(7, rank)
        return torch.nn.functional.dropout(torch.ones(64), 0.5), random.random(), np.random.rand()

    r0, r1, again = draws(0), draws(1), draws(0)
    assert not torch.equal(r0[0], r1[0]) and r0[1] != r1[1] and r0[2] != r1[2]
    assert torch.equal(r0[0], again[0]) and r0[1:] == again[1:]


def test_eval_every_epochs_and_bn_sources_choose_the_evaluations_and_the_last_epoch_has_all(train_in_process, tmp_path):
    import json

    out = tmp_path / "run"
    s = train_in_process(["model.name=test_resnet", "data.batch_size=32", "schedule.epochs=3", "schedule.warmup_epochs=0",
                          "averaging.start_epoch=0", "bn.recompute_batches=2", "eval.every_epochs=2",
                          "eval.bn_sources=[recompute, online]", f"output.dir={out}"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert ["eval/online/top1" in r for r in records] == [False, True, True]
    evaluated = [sorted({k.split("/")[2] for k in r if k.startswith("eval/averaged/")}) for r in records]
    assert evaluated == [[], ["online", "recompute"], ["averaged", "initial", "online", "recompute", "swa_start"]]
    assert sorted(s["eval"]["averaged"]) == evaluated[-1] and s["eval"]["online"]["top1"] == records[-1]["eval/online/top1"]
    assert ("eval.bn_sources = ['recomptue']: expected a list of one of 'initial', 'swa_start', 'online', 'averaged', "
            "'recompute' or null") in _errors(["eval.bn_sources=[recomptue]"])
    assert ("eval.every_epochs = 2: schedule.name = 'plateau' reads eval/online/top1 after every epoch; use 1, or "
            "schedule.plateau_metric = 'train/loss'") in _errors(["eval.every_epochs=2", "schedule.name=plateau"])
