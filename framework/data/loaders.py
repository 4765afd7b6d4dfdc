"""Datasets and loaders through timm's pipeline, sharded across processes.

Train: each process draws a distinct shard (DistributedSampler, drop_last, reseeded per epoch).
Eval: every process runs the same number of batches (collectives inside a forward, as
under ZeRO-3, must not hang); the padding a sampler adds carries target -1 and is never counted.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from framework.data.sampling import EpochTagged, SeededAugmentation, ShardSampler
from framework.recipe.schema import DataConfig

DIGITS_VERSION = "v1"  # bump when the split or encoding changes: invalidates caches
DIGITS_VAL_FRACTION = 0.2


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bnswa"


DIGITS_SPLITS = ("train", "val")


def digits_split(targets) -> tuple:
    """(train indices, val indices) of scikit-learn's digits: stratified, seed 0, the same on every machine."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    return train_test_split(np.arange(len(targets)), test_size=DIGITS_VAL_FRACTION, random_state=0, stratify=targets)


def digits_folder(cache_dir: Path | None = None) -> Path:
    """Where the digits are (or will be) written; validation reads this and writes nothing."""
    return (cache_dir or default_cache_dir()) / f"digits-{DIGITS_VERSION}"


def ensure_digits_folder(cache_dir: Path | None = None) -> Path:
    """Write scikit-learn's 8x8 digits once as `train/<class>/*.png` and `val/<class>/*.png`.

    The split is fixed (stratified, seed 0). Written to a temporary folder and renamed, so
    concurrent processes and interrupted writes never leave a half-written cache.
    """
    root = digits_folder(cache_dir)
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    train_idx, val_idx = digits_split(digits.target)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".digits-", dir=root.parent))
    for split, ids in (("train", train_idx), ("val", val_idx)):
        for i in ids:
            folder = tmp / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(folder / f"{i:04d}.png")
    try:
        tmp.rename(root)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return root


class SyntheticDataset(Dataset):
    """Fixed random tensors (already normalised) for throughput benchmarks."""

    def __init__(self, size: int, image_size: int, num_classes: int, in_chans: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(size, in_chans, image_size, image_size, generator=g)
        self.targets = torch.randint(0, num_classes, (size,), generator=g)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], int(self.targets[i])


class PaddedEval(Dataset):
    """Pads a dataset to a multiple of the world size; padded items have target -1."""

    def __init__(self, dataset: Dataset, world_size: int):
        self.dataset = dataset
        self.real = len(dataset)
        self.total = -(-self.real // world_size) * world_size

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, i):
        image, target = self.dataset[i % self.real]
        return image, target if i < self.real else -1


@dataclass
class Loaders:
    train: DataLoader  # or framework.data.device.DeviceBatches around it, with CUDA's prefetcher
    val: DataLoader
    train_sampler: ShardSampler
    num_val_images: int
    workers: int  # loader worker processes per training process (data.workers resolved)


@dataclass(frozen=True)
class Pipeline:
    mean: tuple
    std: tuple
    interpolation: str
    crop_pct: float


def _per_channel(values, in_chans: int | None) -> tuple:
    """A 3-channel default for a model with another channel count: its mean, once per channel."""
    values = tuple(values)
    if in_chans is None or len(values) == in_chans:
        return values
    return (sum(values) / len(values),) * in_chans


def resolve_pipeline(cfg: DataConfig, model, pretrained: bool, stats: tuple | None = None,
                     in_chans: int | None = None) -> Pipeline:
    """Normalisation from the recipe, else the dataset's own `stats` (mean, std) when training from
    scratch, else the model's pretrained config. Interpolation and eval crop from the recipe, else the
    pretrained config when the weights are pretrained; a model trained from scratch here has no
    evaluation protocol of its own, so it sees the whole image, bilinear."""
    pcfg = getattr(model, "pretrained_cfg", {}) or {}
    own_mean, own_std = stats if stats is not None and not pretrained else (None, None)
    return Pipeline(
        mean=_per_channel(cfg.mean or own_mean or pcfg.get("mean", (0.485, 0.456, 0.406)), in_chans),
        std=_per_channel(cfg.std or own_std or pcfg.get("std", (0.229, 0.224, 0.225)), in_chans),
        interpolation=cfg.interpolation or (pcfg.get("interpolation", "bilinear") if pretrained else "bilinear"),
        crop_pct=cfg.crop_pct or (pcfg.get("crop_pct", 1.0) if pretrained else 1.0),
    )


def resolve_run_pipeline(cfg: DataConfig, model, in_chans: int, pretrained: bool) -> Pipeline:
    """The run's normalisation and resizing: Fashion-MNIST brings its own mean and std."""
    from framework.data import fashion_mnist

    stats = (fashion_mnist.MEAN * in_chans, fashion_mnist.STD * in_chans) if cfg.source == "fashion_mnist" else None
    return resolve_pipeline(cfg, model, pretrained, stats, in_chans)


def create_train_transform(cfg: DataConfig, p: Pipeline, device_side: bool = False):
    """timm's training transform with the recipe's `data.augment` (its flag names: auto_augment, re_prob, ...).
    `device_side`: stop at a uint8 tensor; normalisation and erasing run on the device (framework/data/device.py)."""
    from timm.data import create_transform

    from framework.data.augment import make_policies_safe

    aug = cfg.augment
    return make_policies_safe(create_transform(
        cfg.image_size, is_training=True, scale=tuple(aug.scale), ratio=tuple(aug.ratio), hflip=aug.hflip,
        vflip=aug.vflip, color_jitter=aug.color_jitter, auto_augment=aug.auto_augment, re_prob=aug.re_prob,
        re_mode=aug.re_mode, re_count=aug.re_count, interpolation=p.interpolation, mean=p.mean, std=p.std,
        use_prefetcher=device_side,
    ))


def check_augment(cfg: DataConfig, errors: list[str]) -> None:
    """A policy string timm cannot parse is a validation error, not a crash in the first batch."""
    if cfg.augment.auto_augment is None:
        return
    from framework.data.policies import policy_problem

    if (problem := policy_problem(cfg.augment.auto_augment)) is not None:
        errors.append(f"data.augment.auto_augment = {cfg.augment.auto_augment!r}: {problem}")
        return
    try:
        create_train_transform(cfg, Pipeline((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", 1.0))
    except (AssertionError, ValueError, KeyError, IndexError) as e:
        errors.append(f"data.augment.auto_augment = {cfg.augment.auto_augment!r}: timm cannot parse it ({type(e).__name__}: "
                      f"{e}); e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, v0, original")


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def split_path(root: Path, split: str) -> Path | None:
    """A split is a folder `<root>/<split>` of class folders, or a tar file `<root>/<split>.tar` of them."""
    for path in (root / split, root / f"{split}.tar"):
        if path.exists():
            return path
    return None


def split_classes(root: Path, split: str) -> list[str]:
    path = split_path(root, split)
    if path is None:
        return []
    if path.is_dir():
        return sorted((p.name for p in path.iterdir() if p.is_dir()), key=_natural_key)
    import tarfile

    with tarfile.open(path) as tar:  # member names: [./]<class>/<file>
        names = {Path(m.name).parts[-2] for m in tar.getmembers() if m.isfile() and len(Path(m.name).parts) >= 2}
    return sorted(names, key=_natural_key)


def folder_class_map(root: Path, train_split: str, class_map: str | None) -> dict[str, int]:
    """One class numbering for every split: the `class_map` file's lines, else the training split's folders."""
    names = ([line.strip() for line in Path(class_map).read_text().splitlines() if line.strip()] if class_map
             else split_classes(root, train_split))
    return {name: i for i, name in enumerate(names)}


def create_datasets(cfg: DataConfig, model, num_classes: int, in_chans: int, seed: int, pretrained: bool = False,
                    train_transform: str = "train", device_side: bool = False, pipeline: Pipeline | None = None):
    """(train, val) datasets; `train_transform="eval"` gives the training images the evaluation transform;
    `device_side`: images as uint8 tensors, normalised on the device (framework/data/device.py);
    `pipeline`: the run's, when the caller resolved it already."""
    if cfg.source == "synthetic":
        make = lambda n, s: SyntheticDataset(n, cfg.image_size, num_classes, in_chans, s)  # noqa: E731
        return make(cfg.synthetic_train_size, seed), make(cfg.synthetic_val_size, seed + 1)
    from timm.data import create_dataset, create_transform

    from framework.data import fashion_mnist

    p = pipeline or resolve_run_pipeline(cfg, model, in_chans, pretrained)
    eval_tf = create_transform(cfg.image_size, is_training=False, crop_pct=p.crop_pct, interpolation=p.interpolation,
                               mean=p.mean, std=p.std, use_prefetcher=device_side)
    train_tf = create_train_transform(cfg, p, device_side) if train_transform == "train" else eval_tf
    if cfg.source == "fashion_mnist":
        train, val = fashion_mnist.create_fashion_mnist(cfg.root, default_cache_dir(), train_tf, eval_tf, in_chans)
        return fixed_subset(train, cfg.train_subset), val
    if cfg.source == "timm":
        from framework.data.timm_datasets import create_timm_dataset

        return (fixed_subset(create_timm_dataset(cfg, cfg.train_split, train_tf, in_chans), cfg.train_subset),
                create_timm_dataset(cfg, cfg.val_split, eval_tf, in_chans))
    root = ensure_digits_folder(Path(cfg.root) if cfg.root else None) if cfg.source == "digits" else Path(cfg.root)
    mode = "L" if in_chans == 1 else "RGB"
    # timm numbers each split's folders on its own: a split missing a class would shift later labels
    classes = folder_class_map(root, cfg.train_split, cfg.class_map)
    train = create_dataset("", root=str(split_path(root, cfg.train_split)), is_training=True, input_img_mode=mode,
                           transform=train_tf, class_map=classes)
    val = create_dataset("", root=str(split_path(root, cfg.val_split)), input_img_mode=mode, transform=eval_tf,
                         class_map=classes)
    return fixed_subset(train, cfg.train_subset), val


def fixed_subset(dataset: Dataset, size: int | None) -> Dataset:
    """The same `size` training images for every run and seed: the first of a permutation fixed by seed 0."""
    if size is None or size >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:size]
    return Subset(dataset, sorted(order.tolist()))


MAX_AUTO_WORKERS = 8


def resolve_workers(setting: int | str, local_processes: int, cores: int | None = None,
                    compute_threads: int | None = None) -> int:
    """`data.workers`: a count as given; `auto`: the cores this process's share of the machine leaves after its
    own compute threads (at most 8). On a GPU the step needs one thread, so the rest of the share decodes and
    augments; on a CPU, training's threads already take the share (OMP_NUM_THREADS = cores / processes), and
    workers would only compete with them: measured on 2 cores, 0 workers beat 1 and 2 (README, Data)."""
    if setting != "auto":
        return int(setting)
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    if compute_threads is None:
        compute_threads = 1 if torch.cuda.is_available() else torch.get_num_threads()
    return max(0, min(MAX_AUTO_WORKERS, cores // max(1, local_processes) - compute_threads))


def loader_options(cfg: DataConfig, workers: int, pin_memory: bool) -> dict:
    """Worker count, persistent workers and prefetch depth for every loader of a run."""
    more = dict(persistent_workers=True, prefetch_factor=cfg.prefetch_factor) if workers > 0 else {}
    return dict(num_workers=workers, pin_memory=pin_memory, **more)


def local_processes(world_size: int) -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size))


def create_plain_train_loader(cfg: DataConfig, dataset, rank: int, world_size: int, seed: int, pin_memory: bool) -> DataLoader:
    """Each process's shard of `dataset` (no augmentation to seed): the recompute pass's eval-transform inputs."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    workers = resolve_workers(cfg.workers, local_processes(world_size))
    return DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                      **loader_options(cfg, workers, pin_memory))


def create_loaders(cfg: DataConfig, train_ds, val_ds, rank: int, world_size: int, seed: int, pin_memory: bool,
                   on_device=None) -> Loaders:
    """`on_device(loader, train)` (framework/data/device.py, with CUDA's prefetcher) wraps both loaders."""
    train_sampler = ShardSampler(train_ds, num_replicas=world_size, rank=rank, seed=seed)
    padded = PaddedEval(val_ds, world_size)
    val_sampler = DistributedSampler(padded, num_replicas=world_size, rank=rank, shuffle=False)
    workers = resolve_workers(cfg.workers, local_processes(world_size))
    common = loader_options(cfg, workers, pin_memory)
    g = torch.Generator().manual_seed(seed + rank)  # worker seeds: distinct per rank, fixed per run
    # In workers, each batch's augmentation is seeded by (seed, epoch, first index): a resumed epoch repeats it exactly
    train = DataLoader(SeededAugmentation(train_ds, seed), batch_size=cfg.batch_size, sampler=EpochTagged(train_sampler),
                       drop_last=True, generator=g, **common)
    val = DataLoader(padded, batch_size=cfg.eval_batch_size, sampler=val_sampler, **common)
    if on_device is not None:
        train, val = on_device(train, True), on_device(val, False)
    return Loaders(train=train, val=val, train_sampler=train_sampler, num_val_images=len(val_ds), workers=workers)
