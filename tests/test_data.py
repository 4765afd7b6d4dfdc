"""Data: the bundled digits folder, disjoint training shards, every validation image counted once."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import timm

from framework.data.loaders import PaddedEval, create_datasets, create_loaders, ensure_digits_folder
from framework.recipe.schema import AugmentConfig, DataConfig


def test_digits_folder_is_real_images_with_a_fixed_split(digits_root, tmp_path):
    from PIL import Image

    train = sorted(p.relative_to(digits_root / "train") for p in (digits_root / "train").rglob("*.png"))
    val = sorted(p.relative_to(digits_root / "val") for p in (digits_root / "val").rglob("*.png"))
    assert (len(train), len(val)) == (1437, 360)
    assert len({p.name for p in train} | {p.name for p in val}) == 1797  # disjoint, all of them
    assert sorted(Counter(p.parts[0] for p in val)) == [str(i) for i in range(10)]
    assert Image.open(digits_root / "val" / val[0]).size == (8, 8)
    # Written again elsewhere, the split is the same: it is fixed, not drawn per run.
    again = ensure_digits_folder(tmp_path)
    assert sorted(p.relative_to(again / "val") for p in (again / "val").rglob("*.png")) == val


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_eval_counts_each_image_once_across_processes(world):
    base = list(range(361))  # a size no world size above divides
    padded = PaddedEval([(i, i % 10) for i in base], world)
    from torch.utils.data import DistributedSampler

    counted, batches = Counter(), []
    for rank in range(world):
        idx = list(DistributedSampler(padded, num_replicas=world, rank=rank, shuffle=False))
        batches.append(len(idx))
        counted.update(padded[i][0] for i in idx if padded[i][1] >= 0)
    assert counted == Counter(base)
    assert len(set(batches)) == 1  # same number of eval items on every process


def test_training_shards_are_disjoint_and_loaders_use_timm_transforms(digits_root):
    cfg = DataConfig(batch_size=16, image_size=32)
    model = timm.create_model("test_resnet", num_classes=10)
    train_ds, val_ds = create_datasets(cfg, model, 10, 3, seed=0)
    shards = []
    for rank in range(2):
        loaders = create_loaders(cfg, train_ds, val_ds, rank=rank, world_size=2, seed=0, pin_memory=False)
        loaders.train_sampler.set_epoch(3)
        shards.append(set(loaders.train_sampler))
        images, targets = next(iter(loaders.train))
        assert images.shape == (16, 3, 32, 32) and targets.max() < 10
        assert loaders.num_val_images == 360
    assert not shards[0] & shards[1]
    assert len(shards[0]) == len(shards[1]) == 1437 // 2


def _batches(cfg, train_ds, val_ds, epoch, skip_per_rank=0, limit=None):
    import torch

    loaders = create_loaders(cfg, train_ds, val_ds, rank=1, world_size=2, seed=5, pin_memory=False)
    loaders.train_sampler.set_epoch(epoch)
    loaders.train_sampler.skip(2 * skip_per_rank)
    out = []
    for images, targets in loaders.train:
        if limit is not None and len(out) == limit:
            break
        out.append((images.clone(), targets.clone()))
    return torch.cat([b[0] for b in out]), torch.cat([b[1] for b in out])


def test_with_workers_a_resumed_epoch_repeats_the_interrupted_one_bitwise(digits_root):
    """Random augmentation in worker processes: stopped after 5 batches, a fresh loader (fresh workers)
    that skips them yields exactly the rest of the uninterrupted epoch, whatever the worker count."""
    import torch

    cfg = DataConfig(batch_size=16, image_size=32, workers=2, augment=AugmentConfig(color_jitter=0.4))
    train_ds, val_ds = create_datasets(cfg, timm.create_model("test_resnet", num_classes=10), 10, 3, seed=0)
    full_x, full_y = _batches(cfg, train_ds, val_ds, epoch=2)
    head_x, head_y = _batches(cfg, train_ds, val_ds, epoch=2, limit=5)
    rest_x, rest_y = _batches(cfg, train_ds, val_ds, epoch=2, skip_per_rank=5 * 16)
    assert torch.equal(torch.cat([head_x, rest_x]), full_x) and torch.equal(torch.cat([head_y, rest_y]), full_y)
    other_epoch_x, _ = _batches(cfg, train_ds, val_ds, epoch=3, limit=5)
    assert not torch.equal(other_epoch_x, head_x)  # augmentation still differs between epochs
    one_worker = DataConfig(batch_size=16, image_size=32, workers=1, augment=AugmentConfig(color_jitter=0.4))
    assert torch.equal(_batches(one_worker, train_ds, val_ds, epoch=2, limit=5)[0], head_x)


def _fashion_mnist_or_skip():
    from framework.data.fashion_mnist import DEBIAN_ROOT, missing_files

    if missing_files(None):  # .ci/run installs it (as root); elsewhere: apt-get install dataset-fashion-mnist
        pytest.skip(f"Fashion-MNIST IDX files not in {DEBIAN_ROOT} (Debian package dataset-fashion-mnist)")


def test_fashion_mnist_reads_the_debian_files_through_timm(tmp_path, monkeypatch):
    import torch

    from framework.data.fashion_mnist import ensure_raw_folder

    _fashion_mnist_or_skip()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = DataConfig(source="fashion_mnist", image_size=28, augment=AugmentConfig(scale=[1.0, 1.0], hflip=0.0))
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    train, val = create_datasets(cfg, model, 10, 1, seed=0)
    assert (len(train), len(val)) == (60000, 10000)  # the fixed validation split: all 10,000 test images
    image, label = val[0]
    assert image.shape == (1, 28, 28) and label == 9  # the first test image is an ankle boot
    assert abs(image.mean().item() - (0.0 - 0.2860) / 0.3530) < 3  # normalised with the dataset's own statistics
    assert Counter(int(val.targets[i]) for i in range(10000)) == Counter({c: 1000 for c in range(10)})
    rgb = create_datasets(cfg, timm.create_model("test_resnet", num_classes=10), 10, 3, seed=0)[1]
    assert torch.equal(rgb[0][0][0], rgb[0][0][2])  # greyscale shown to a 3-channel model
    raw = tmp_path / "cache" / "bnswa" / "fashion-mnist-v1" / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(f"{s}-{k}-idx{n}-ubyte" for s in ("train", "t10k")
                                                           for k, n in (("images", 3), ("labels", 1)))
    assert not list(raw.parents[1].parent.glob(".fashion-mnist-*"))  # no temporary folder left
    assert ensure_raw_folder(None, tmp_path / "cache" / "bnswa") == raw.parents[1]  # written once


def test_a_training_subset_is_the_same_for_every_run_and_seed(digits_root):
    cfg = DataConfig(source="digits", root=str(digits_root.parent), train_subset=100)
    model = timm.create_model("test_resnet", num_classes=10)
    a = create_datasets(cfg, model, 10, 3, seed=0)[0]
    b = create_datasets(cfg, model, 10, 3, seed=5)[0]
    assert len(a) == 100 and a.indices == b.indices and len(set(a.indices)) == 100


def test_missing_fashion_mnist_files_are_a_one_line_validation_error(tmp_path):
    from conftest import ROOT

    from framework.recipe.errors import RecipeError
    from framework.recipe.resolve import resolve_recipe

    with pytest.raises(RecipeError) as err:
        resolve_recipe(ROOT / "recipes" / "quickstart.yaml", ["data.source=fashion_mnist", f"data.root={tmp_path}"])
    line = next(e for e in err.value.errors if e.startswith("data.root"))
    assert "train-images-idx3-ubyte.gz" in line and "apt-get install dataset-fashion-mnist" in line


def test_a_torchvision_dataset_through_timm_trains_and_counts_every_validation_image(train_in_process, tmp_path):
    """data.source = timm, data.dataset = torch/fashion_mnist on local files (the Debian package's, in
    torchvision's layout): a map-style dataset, so validation counts all 10,000 test images once."""
    from framework.data.fashion_mnist import ensure_raw_folder

    _fashion_mnist_or_skip()
    root = ensure_raw_folder(None, tmp_path / "cache")
    summary = train_in_process(["data.source=timm", "data.dataset=torch/fashion_mnist", f"data.root={root}",
                                "model.name=test_resnet", "model.in_chans=1", "data.image_size=28", "data.train_subset=2048",
                                "data.eval_batch_size=1000", "schedule.epochs=1", "schedule.warmup_epochs=0", "averaging.start_epoch=0",
                                "bn.recompute_batches=8", f"output.dir={tmp_path / 'run'}"])
    assert summary["eval"]["online"]["images"] == 10000
    assert summary["eval"]["online"]["top1"] > 30.0  # 64 updates of a real dataset: well above chance (10%)


def test_timm_dataset_names_that_cannot_keep_the_guarantees_are_refused_at_validation(tmp_path):
    from conftest import ROOT

    from framework.recipe.errors import RecipeError
    from framework.recipe.resolve import resolve_recipe

    def errors(*overrides) -> str:
        with pytest.raises(RecipeError) as err:
            resolve_recipe(ROOT / "recipes" / "quickstart.yaml", ["data.source=timm", f"data.root={tmp_path}", *overrides])
        return "\n".join(err.value.errors)

    assert "data.dataset = 'wds/shards': an iterable dataset (wds/) has no index, so exact resume" in errors(
        "data.dataset=wds/shards")
    assert "data.dataset = 'cifar10': choices are torch/<name>" in errors("data.dataset=cifar10")
    assert f"data.root = '{tmp_path}': torch/cifar10 is not there (RuntimeError: Dataset not found" in errors(
        "data.dataset=torch/cifar10")
    assert "data.dataset = None: data.source = 'timm' needs a timm dataset name" in errors()


def _write_hf_dataset(digits_root, target):
    """The digits as a Hugging Face DatasetDict (the same PNG bytes, in the folder reader's order), saved both
    with save_to_disk (`target/disk`) and as Parquet files per split (`target/parquet/<split>.parquet`)."""
    import datasets

    from framework.data.loaders import folder_class_map

    classes = folder_class_map(digits_root, "train", None)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(classes))})
    splits = {}
    for split in ("train", "val"):
        samples = timm.data.create_dataset("", root=str(digits_root / split), class_map=classes).reader.samples
        splits[split] = datasets.Dataset.from_dict(
            {"image": [{"bytes": open(path, "rb").read(), "path": None} for path, _ in samples],
             "label": [label for _, label in samples]}, features=features)
        (target / "parquet").mkdir(parents=True, exist_ok=True)
        splits[split].to_parquet(str(target / "parquet" / f"{split}.parquet"))
    datasets.DatasetDict(splits).save_to_disk(str(target / "disk"))


def test_tar_files_and_hugging_face_datasets_on_disk_train_as_the_folders_do(train_in_process, tmp_path, digits_root):
    """The same images through `<split>.tar` files, a save_to_disk DatasetDict (`hfds/`) and Parquet files
    (`hfds/`): map-style datasets with the folders' index, so every run is the folders' run bit for bit:
    the same shards and augmentation, every validation image once, the same recompute pass."""
    import tarfile

    for split in ("train", "val"):
        with tarfile.open(tmp_path / f"{split}.tar", "w") as tar:
            tar.add(digits_root / split, arcname=".")
    _write_hf_dataset(digits_root, tmp_path / "hf")
    args = ["model.name=test_resnet", "schedule.epochs=1", "schedule.warmup_epochs=0", "bn.recompute_batches=4",
            "data.train_subset=512"]  # the same 512 indices of each: the readers must agree on the order too
    runs = {name: train_in_process([*args, *source, f"output.dir={tmp_path / name}"]) for name, source in {
        "folders": ["data.source=folder", f"data.root={digits_root}"],
        "tar": ["data.source=folder", f"data.root={tmp_path}"],
        "hfds-disk": ["data.source=timm", f"data.root={tmp_path / 'hf'}", "data.dataset=hfds/disk"],
        "hfds-parquet": ["data.source=timm", f"data.dataset=hfds/{tmp_path / 'hf' / 'parquet'}"],
    }.items()}
    reference = runs.pop("folders")
    for name, s in runs.items():
        assert s["eval"]["online"]["images"] == 360, name
        assert s["eval"]["online"]["top1"] == reference["eval"]["online"]["top1"], name
        assert s["eval"]["averaged"]["recompute"]["top1"] == reference["eval"]["averaged"]["recompute"]["top1"], name
        losses = [json.loads(line)["train/loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert losses == [json.loads(line)["train/loss"] for line in (tmp_path / "folders" / "metrics.jsonl").read_text().splitlines()]


def test_a_hugging_face_dataset_that_is_not_on_disk_or_lacks_a_split_is_one_line(tmp_path, digits_root):
    from conftest import ROOT

    from framework.recipe.errors import RecipeError
    from framework.recipe.resolve import resolve_recipe

    _write_hf_dataset(digits_root, tmp_path)

    def errors(*overrides) -> str:
        with pytest.raises(RecipeError) as err:
            resolve_recipe(ROOT / "recipes" / "quickstart.yaml", ["data.source=timm", f"data.root={tmp_path}", *overrides])
        return "\n".join(err.value.errors)

    assert "data.dataset = 'hfds/beans': no such local folder" in errors("data.dataset=hfds/beans")
    assert "split 'test' is not in the saved DatasetDict (splits: train, val)" in errors("data.dataset=hfds/disk",
                                                                                         "data.val_split=test")
    assert "no save_to_disk DatasetDict and no Parquet files for split 'test'" in errors("data.dataset=hfds/parquet",
                                                                                         "data.val_split=test")
    assert "model.num_classes = 5: hfds/disk has 10 classes" in errors("data.dataset=hfds/disk", "model.num_classes=5")


def test_workers_auto_leaves_the_compute_threads_their_cores_and_loaders_keep_workers_and_prefetch(digits_root):
    from framework.data.loaders import resolve_workers
    from framework.recipe.errors import RecipeError
    from framework.recipe.resolve import resolve_recipe

    # (processes on the machine, cores, compute threads per process) -> workers per process
    assert resolve_workers("auto", 1, 2, 2) == 0  # CPU: 2 threads take both cores (0 beat 1 and 2 here)
    assert resolve_workers("auto", 2, 2, 1) == 0
    assert resolve_workers("auto", 1, 16, 1) == 8  # one GPU: all but the step's thread, at most 8
    assert resolve_workers("auto", 8, 64, 1) == 7
    assert resolve_workers(3, 1, 2, 2) == 3  # a count is kept, 0 too
    quickstart = "recipes/quickstart.yaml"
    assert resolve_recipe(quickstart, []).data.workers == "auto"
    with pytest.raises(RecipeError) as err:
        resolve_recipe(quickstart, ["data.workers=many"])
    assert str(err.value) == "data.workers = 'many': expected an integer or one of 'auto'"
    cfg = DataConfig(batch_size=16, image_size=32, workers=2, prefetch_factor=3)
    train_ds, val_ds = create_datasets(cfg, timm.create_model("test_resnet", num_classes=10), 10, 3, seed=0)
    loaders = create_loaders(cfg, train_ds, val_ds, rank=0, world_size=1, seed=0, pin_memory=False)
    for loader in (loaders.train, loaders.val):
        assert (loader.num_workers, loader.persistent_workers, loader.prefetch_factor) == (2, True, 3)


def test_device_side_batches_equal_the_cpu_transform_and_are_erased_after_the_copy(digits_root):
    """CUDA's prefetcher path (framework/data/device.py) run on the CPU device here; the GPU suite runs it on
    CUDA. The loader hands over uint8 images; normalised after the copy they equal the CPU transform's
    floats, and training batches are randomly erased after normalisation, each image in one rectangle."""
    import torch

    from framework.data.device import DeviceBatches, create_device_batches
    from framework.data.loaders import resolve_run_pipeline

    cfg = DataConfig(batch_size=16, image_size=32, workers=0, augment=AugmentConfig(re_prob=1.0))
    model = timm.create_model("test_resnet", num_classes=10)
    p = resolve_run_pipeline(cfg, model, 3, False)
    wrap = create_device_batches(cfg, p.mean, p.std, torch.device("cpu"))
    on_cpu = create_datasets(cfg, model, 10, 3, seed=0)
    raw = create_datasets(cfg, model, 10, 3, seed=0, device_side=True)
    a = next(iter(create_loaders(cfg, *on_cpu, rank=0, world_size=1, seed=0, pin_memory=False).val))
    b = next(iter(create_loaders(cfg, *raw, rank=0, world_size=1, seed=0, pin_memory=False, on_device=wrap).val))
    assert raw[1][0][0].dtype == torch.uint8 and b[0].dtype == torch.float32
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.equal(a[1], b[1])
    plain = create_loaders(cfg, *raw, rank=0, world_size=1, seed=0, pin_memory=False)
    plain.train_sampler.set_epoch(0)
    x, y = next(iter(plain.train))
    clean = next(iter(DeviceBatches([(x, y)], torch.device("cpu"), p.mean, p.std)))[0]
    erased = next(iter(wrap([(x, y)], True)))[0]
    changed = (clean != erased).flatten(1).float().mean(1)
    assert bool(((changed > 0) & (changed < 1)).all()), changed
