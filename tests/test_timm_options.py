"""What people bring from timm's train.py: augmentation policies, Mixup/CutMix, losses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT

from framework.recipe.errors import RecipeError
from framework.recipe.resolve import resolve_recipe

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def _errors(overrides: list[str]) -> str:
    with pytest.raises(RecipeError) as err:
        resolve_recipe(QUICKSTART, overrides)
    return "\n".join(err.value.errors)


def test_augment_keys_reach_timms_transform_and_a_bad_policy_is_named():
    from PIL import Image

    from framework.data.loaders import Pipeline, create_train_transform

    r = resolve_recipe(QUICKSTART, ["data.augment.auto_augment=rand-m9-mstd0.5-inc1", "data.augment.re_prob=0.25",
                                    "data.augment.re_count=2", "data.augment.vflip=0.5"])
    tf = create_train_transform(r.data, Pipeline((0.5,) * 3, (0.5,) * 3, "bilinear", 1.0))
    names = [type(t).__name__ for t in tf.transforms]
    assert {"RandAugment", "RandomVerticalFlip", "RandomErasing"} <= set(names), names
    erasing = tf.transforms[names.index("RandomErasing")]
    assert (erasing.probability, erasing.max_count, erasing.mode) == (0.25, 2, "pixel")
    out = tf(Image.new("RGB", (8, 8), (120, 30, 200)))
    assert out.shape == (3, 32, 32) and torch.isfinite(out).all()
    text = _errors(["data.augment.auto_augment=rand-q9"])
    assert text.startswith("data.augment.auto_augment = 'rand-q9': unknown RandAugment section 'q9'; sections are m<int>, ")


def test_losses_are_timms_and_match_their_definitions():
    from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy

    from framework.training.losses import create_loss

    r = resolve_recipe(QUICKSTART, ["loss.smoothing=0.1"])
    logits, hard = torch.randn(6, 10, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3, 4, 5])
    ce = create_loss(r.loss, mixup_active=False)
    assert ce(logits, hard).item() == pytest.approx(F.cross_entropy(logits, hard, label_smoothing=0.1).item())
    soft = F.one_hot(hard, 10).float() * 0.7 + 0.03
    # with Mixup the targets arrive smoothed already: no second smoothing
    assert create_loss(r.loss, mixup_active=True)(logits, soft).item() == pytest.approx(
        -(soft * logits.log_softmax(-1)).sum(-1).mean().item())
    bce = create_loss(resolve_recipe(QUICKSTART, ["loss.name=bce", "loss.bce_target_thresh=0.2"]).loss, False)
    assert isinstance(bce, BinaryCrossEntropy) and bce.target_threshold == 0.2
    sce = resolve_recipe(QUICKSTART, ["loss.name=soft_ce", "mixup.mixup_alpha=0.2"]).loss
    assert isinstance(create_loss(sce, True), SoftTargetCrossEntropy)
    assert "loss.name = 'soft_ce': needs the soft targets of mixup or cutmix" in _errors(["loss.name=soft_ce"])
    assert "loss.bce_target_thresh = 0.2: only with loss.name = 'bce' (got 'ce')" in _errors(["loss.bce_target_thresh=0.2"])


def test_mixup_draws_from_its_own_stream_and_a_restored_stream_repeats_them():
    from framework.checkpoint.store import decode, encode
    from framework.data.mixup import create_mixup

    r = resolve_recipe(QUICKSTART, ["mixup.mixup_alpha=0.8", "mixup.cutmix_alpha=1.0", "mixup.off_epoch=3",
                                    "loss.smoothing=0.1", "schedule.epochs=4"])
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    targets = torch.arange(8) % 10
    a = create_mixup(r.mixup, r.loss, 10, seed=0, rank=0)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first = [a(images.clone(), targets, epoch=0) for _ in range(3)]
    assert (np.random.get_state()[1] == before).all()  # the process's own NumPy stream is untouched
    assert not torch.equal(first[0][0], images) and first[0][1].shape == (8, 10)

    tensors: dict = {}
    saved = decode(json.loads(json.dumps(encode(a.state_dict(), tensors))), tensors)  # as a checkpoint holds it
    b = create_mixup(r.mixup, r.loss, 10, seed=0, rank=0)
    b.load_state_dict(saved)
    for _ in range(3):
        xa, ya = a(images.clone(), targets, epoch=1)
        xb, yb = b(images.clone(), targets, epoch=1)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = create_mixup(r.mixup, r.loss, 10, seed=0, rank=1)
    assert not torch.equal(other(images.clone(), targets, epoch=0)[0], first[0][0])  # each rank its own draws
    x, y = a(images.clone(), targets, epoch=3)  # off_epoch: clean images, smoothed one-hot targets
    assert torch.equal(x, images) and y.max().item() == pytest.approx(0.91) and y.min().item() == pytest.approx(0.01)
    assert "data.batch_size = 31: mixup and cutmix need an even batch" in _errors(["mixup.mixup_alpha=0.2", "data.batch_size=31"])
    assert "mixup.off_epoch = 8: mixing would never stop" in _errors(["mixup.mixup_alpha=0.2", "mixup.off_epoch=8"])


def test_a_run_with_mixup_cutmix_randaugment_and_bce_resumes_exactly(train_in_process, tmp_path, capsys):
    """The Mixup stream is in each process's checkpoint: a run resumed from epoch 1 mixes as the uninterrupted one.
    RandAugment at m10 with inc1 asks for 0-bit posterize on about one image in 30 (it crashed on Pillow 11+)."""
    args = ["model.name=test_resnet", "data.batch_size=32", "schedule.epochs=2", "schedule.warmup_epochs=0",
            "averaging.start_epoch=1", "bn.recompute_batches=4", "mixup.mixup_alpha=0.2", "mixup.cutmix_alpha=1.0",
            "loss.name=bce", "loss.smoothing=0.1", "data.augment.auto_augment=rand-m10-mstd0.5-inc1",
            "data.augment.re_prob=0.25", "checkpoint.every=1"]
    full = tmp_path / "full"
    s = train_in_process([*args, f"output.dir={full}"])
    assert s["status"] == "completed" and s["eval"]["averaged"]["recompute"]["top1"] > 50.0
    part, first = tmp_path / "part", sorted((full / "checkpoints").glob("epoch-00001-*"))[0]
    capsys.readouterr()
    # the run as it stood after epoch 1 (metrics.jsonl is rewritten from the checkpoint's records)
    resumed = train_in_process([*args, f"output.dir={part}", f"resume={first}"])
    assert f"resumed from {first} at epoch 2" in capsys.readouterr().out  # not a second run from scratch
    a = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/loss"] for r in b] == [r["train/loss"] for r in a]
    assert resumed["eval"]["averaged"]["recompute"]["top1"] == s["eval"]["averaged"]["recompute"]["top1"]


def test_lr_base_rule_betas_eps_and_kwargs_reach_the_optimizer():
    import timm

    from framework.training.builders import create_optimizer, resolve_lr

    r = resolve_recipe(QUICKSTART, ["optimizer.name=adamw", "optimizer.lr=null", "optimizer.lr_base=0.001",
                                    "optimizer.betas=[0.9, 0.95]", "optimizer.eps=1e-6", "optimizer.kwargs.amsgrad=true"])
    assert resolve_lr(r.optimizer, 64) == pytest.approx(0.001 * 0.5)  # Adam-like: sqrt(64 / 256)
    sgd = resolve_recipe(QUICKSTART, ["optimizer.lr=null", "optimizer.lr_base=0.1"]).optimizer
    assert resolve_lr(sgd, 64) == pytest.approx(0.025)  # linear
    opt = create_optimizer(r.optimizer, timm.create_model("test_resnet", num_classes=10), 64)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["amsgrad"]) == (pytest.approx(0.0005), (0.9, 0.95), 1e-6, True)
    text = _errors(["optimizer.name=adamw", "optimizer.kwargs.nesterovv=true"])
    assert text.startswith("optimizer.kwargs.nesterovv = True: not a keyword of timm's 'adamw' optimizer")


def test_layer_decay_scales_each_group_and_swalr_keeps_the_scales():
    """SWALR used to set one learning rate on every group, erasing layer decay once averaging began."""
    import timm

    from framework.averaging.swa import SWA
    from framework.training.builders import create_optimizer

    r = resolve_recipe(QUICKSTART, ["optimizer.layer_decay=0.5"])
    opt = create_optimizer(r.optimizer, timm.create_model("test_resnet", num_classes=10), 32)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert len(scales) >= 3 and scales[-1] == 1.0 and scales[0] < 0.2
    for g in opt.param_groups:
        g["lr"] = 0.1 * g["lr_scale"]  # as timm's scheduler sets it
    swa = SWA(lr=0.02, anneal_epochs=1)
    swa.adjust_lr(opt, steps_since_start=10, steps_per_epoch=10)  # annealed: the constant SWA rate
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02 * g["lr_scale"] for g in opt.param_groups])


def _bn_state(model):
    return [t.clone() for n, t in model.state_dict().items() if "running_" in n or "num_batches" in n]


def test_grad_checkpointing_moves_bn_statistics_once_per_step():
    """Checkpointing reruns each block's forward in backward; without the hooks BN's running statistics
    move twice per step there."""
    import copy

    import timm

    from framework.training.speed import enable_grad_checkpointing

    torch.manual_seed(0)
    plain = timm.create_model("test_resnet", num_classes=10)
    twice, once = copy.deepcopy(plain), copy.deepcopy(plain)
    twice.set_grad_checkpointing(True)  # timm alone
    enable_grad_checkpointing(once)
    x = torch.randn(4, 3, 32, 32)  # as in training: the images need no grad
    for m in (plain, twice, once):
        m.train()
        m(x).sum().backward()
    ref = _bn_state(plain)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(_bn_state(once), ref, strict=True))
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(_bn_state(twice), ref, strict=True))
    grads = [(p.grad, q.grad) for p, q in zip(plain.parameters(), once.parameters(), strict=True)]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in grads)


def test_channels_last_reaches_weights_and_every_input():
    import copy

    import timm

    from framework.training.speed import apply_channels_last

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10).eval()
    nhwc = copy.deepcopy(model)
    apply_channels_last(nhwc)
    conv = nhwc.conv1[0] if isinstance(nhwc.conv1, torch.nn.Sequential) else nhwc.conv1
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    conv.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(nhwc(x), model(x), atol=1e-5) and seen == [True]


def test_compile_in_place_trains_and_swapping_averaged_weights_does_not_recompile(train_in_process, tmp_path):
    """torch.compile on CPU (inductor, which needs a C++ compiler: .ci/run installs g++), after the BN
    conversion; the averaged weights are swapped into the same tensors, so evaluation does not recompile."""
    from torch._dynamo.utils import counters

    counters.clear()
    s = train_in_process(["model.name=test_resnet", "model.compile=true", "model.channels_last=true",
                          "data.batch_size=32", "schedule.epochs=2", "schedule.warmup_epochs=0", "averaging.start_epoch=1",
                          "bn.recompute_batches=4", f"output.dir={tmp_path / 'run'}"])
    assert s["status"] == "completed" and s["eval"]["averaged"]["recompute"]["top1"] > 80.0
    # train mode, eval mode, and the last partial batches: a handful of graphs, not one per evaluation
    assert counters["stats"]["unique_graphs"] <= 6, dict(counters["stats"])
    from safetensors.torch import load_file  # exports keep timm's keys

    keys = load_file(str(tmp_path / "run" / "model_averaged.safetensors")).keys()
    assert not any("_orig_mod" in k for k in keys) and "fc.weight" in keys


def test_accumulating_2_x_16_updates_as_1_x_32_on_a_model_without_bn(train_in_process, tmp_path):
    """Same images in the same order (1,024 of them: no partial batch either way), loss averaged over the
    update's batches: the same 32 updates, the same schedule, the same weights within float tolerance."""
    from safetensors.torch import load_file

    common = ["model.name=test_vit", "data.image_size=32", "data.train_subset=1024", "schedule.epochs=1",
              "schedule.warmup_epochs=0", "averaging.strategy=none", "optimizer.lr=0.05"]
    one = train_in_process([*common, "data.batch_size=32", f"output.dir={tmp_path / 'one'}"])
    two = train_in_process([*common, "data.batch_size=16", "optimizer.accumulate_steps=2", f"output.dir={tmp_path / 'two'}"])
    a = load_file(str(tmp_path / "one" / "model_online.safetensors"))
    b = load_file(str(tmp_path / "two" / "model_online.safetensors"))
    moved = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved < 1e-4, moved
    ra = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert ra[0]["train/lr"] == rb[0]["train/lr"] and ra[0]["train/loss"] == pytest.approx(rb[0]["train/loss"], rel=1e-4)
    assert one["eval"]["online"]["top1"] == pytest.approx(two["eval"]["online"]["top1"], abs=0.3)
    resolve_recipe(QUICKSTART, ["optimizer.accumulate_steps=2", "backend.type=deepspeed"])  # tests/test_deepspeed.py


def test_export_best_holds_the_best_epochs_averaged_weights_with_their_bn_statistics(train_in_process, tmp_path):
    """model_best.safetensors, loaded by timm alone, reproduces the best epoch's logged top-1 (averaged
    weights with the recompute source's statistics), not the last epoch's."""
    import timm
    from timm.data import create_dataset, create_transform

    from framework.data.loaders import ensure_digits_folder

    out = tmp_path / "run"
    metric = "eval/averaged/recompute/top1"
    train_in_process(["model.name=test_resnet", "data.batch_size=32", "schedule.epochs=3", "schedule.warmup_epochs=0",
                      "averaging.start_epoch=0", "bn.recompute_batches=4", f"export.best={metric}",
                      "eval.bn_sources=[recompute]", f"output.dir={out}"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    values = [r[metric] for r in records]
    chosen = json.loads((out / "model_best.json").read_text())
    assert chosen == {"metric": metric, "value": max(values), "epoch": values.index(max(values)) + 1}
    model = timm.create_model("test_resnet", num_classes=10, checkpoint_path=str(out / "model_best.safetensors")).eval()
    tf = create_transform(32, crop_pct=1.0, mean=model.pretrained_cfg["mean"], std=model.pretrained_cfg["std"])
    val = create_dataset("", root=str(ensure_digits_folder()), split="val", transform=tf)
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in torch.utils.data.DataLoader(val, batch_size=128))
    assert abs(100.0 * correct / len(val) - max(values)) <= 100.0 / len(val) + 1e-9
    assert "export.best = 'eval/averaged/recompte/top1': expected" in _errors(["export.best=eval/averaged/recompte/top1"])
    assert "'initial' is not evaluated after each epoch" in _errors(
        ["averaging.strategy=swa", "export.best=eval/averaged/initial/top1", "eval.bn_sources=[recompute]"])


def test_clip_mode_value_bounds_every_element_of_every_update(train_in_process, tmp_path, digits_root):
    """clip_mode=value cuts each gradient element to +-c: with plain SGD at a constant rate no weight moves
    more than updates x lr x c, and one pushed the same way every update moves exactly that (norm clipping
    at c would move every weight far less)."""
    from accelerate.utils import set_seed
    from safetensors.torch import load_file

    from framework.training.models import create_model

    out, lr, c = tmp_path / "run", 0.1, 1e-4
    overrides = ["model.name=test_vit", "averaging.strategy=none", "schedule.epochs=1", "schedule.name=step",
                 "schedule.decay_epochs=100", "schedule.warmup_epochs=0", f"optimizer.lr={lr}", "optimizer.name=momentum", "optimizer.momentum=0",
                 "optimizer.weight_decay=0", f"optimizer.clip_grad={c}", "optimizer.clip_mode=value", f"output.dir={out}"]
    summary = train_in_process(overrides)
    recipe = resolve_recipe(QUICKSTART, overrides)
    set_seed(recipe.seed)  # as the run builds its model
    initial = create_model(recipe.model, recipe.data.image_size)[0].state_dict()
    final = load_file(out / "model_online.safetensors")
    moved = max((final[k] - initial[k]).abs().max().item() for k in final)
    assert summary["eval"]["online"]["images"] > 0
    updates = sum(1 for p in (digits_root / "train").rglob("*") if p.is_file()) // recipe.data.batch_size  # drop_last
    assert moved <= updates * lr * c * (1 + 1e-3)
    assert moved >= 0.99 * updates * lr * c
    assert "for SGD without momentum use optimizer.name = 'momentum'" in _errors(["optimizer.momentum=0"])  # timm's sgd is Nesterov
    assert "optimizer.clip_mode = 'agc': DeepSpeed's engine clips by norm only" in _errors(
        ["optimizer.clip_grad=0.01", "optimizer.clip_mode=agc", "backend.type=deepspeed"])


def test_agc_leaves_the_classifier_out_and_norm_clips_the_total_norm():
    import timm

    from framework.training.builders import create_grad_clipper

    r = resolve_recipe(QUICKSTART, ["optimizer.clip_grad=0.01", "optimizer.clip_mode=agc"])
    model = timm.create_model("test_resnet", num_classes=10)
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    create_grad_clipper(r.optimizer, deepspeed=False)(model)
    head = list(model.parameters())[-2:]
    assert all((p.grad == 10.0).all() for p in head)
    assert all((p.grad < 10.0).any() for p in list(model.parameters())[:-2] if p.ndim > 1)
    norm = resolve_recipe(QUICKSTART, ["optimizer.clip_grad=0.5"]).optimizer
    create_grad_clipper(norm, deepspeed=False)(model)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
    assert total.item() == pytest.approx(0.5, rel=1e-4)
    assert create_grad_clipper(norm, deepspeed=True) is None  # the engine clips (gradient_clipping)
