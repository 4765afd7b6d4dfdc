"""Benchmark: the framework's training loader against `timm.data.create_loader`, on real JPEGs.

Writes a folder of JPEGs (and the same split as a tar), then, in one run, alternates the two loaders
with the same transform settings (random-resized crop at --image-size, RandAugment, random erasing,
mean/std, interpolation) and the same worker count, for --rounds full passes each. Prints images/s per
round and the ratio framework / timm (goal: >= 1.0); then the same loaders with the decode alone
(open, decode, one pixel to a tensor), to show how much of the time is JPEG decoding.

  python benchmarks/bench_data.py [--images 1000] [--workers 2] [--rounds 3] [--image-size 224] [--root DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_jpeg_folder(root: Path, images: int, size: tuple[int, int], classes: int = 10, seed: int = 0) -> Path:
    """`root/{train,val}/<class>/*.jpg` (`images`, and a tenth as many for val): smooth colour fields whose
    frequency depends on the class, with noise (JPEG-compressible like photos), and `root/train.tar`
    holding the training files. Kept when already there."""
    import numpy as np
    from PIL import Image

    if (root / "train.tar").is_file() and sum(1 for _ in (root / "train").rglob("*.jpg")) == images:
        return root
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    for split, count in (("train", images), ("val", max(classes, images // 10))):
        for i in range(count):
            c = i % classes
            base = np.stack([np.sin(xx * (3 + c) + rng.uniform(0, 6)) * np.cos(yy * (2 + k) + rng.uniform(0, 6))
                             for k in range(3)], axis=-1)
            pixels = np.clip((base * 0.5 + 0.5) * 255 + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            folder = root / split / f"class{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)
    with tarfile.open(root / "train.tar", "w") as tar:
        tar.add(root / "train", arcname=".")
    return root


def decode_only(image):
    import torch

    return torch.tensor(image.getpixel((0, 0)))  # the image is decoded by the dataset's convert()


def our_loader(split: Path, args, decode: bool):
    import timm

    from framework.data.loaders import Pipeline, create_loaders, create_train_transform, folder_class_map
    from framework.recipe.schema import AugmentConfig, DataConfig

    cfg = DataConfig(source="folder", root=str(split.parent), image_size=args.image_size, batch_size=args.batch,
                     workers=args.workers, augment=AugmentConfig(auto_augment=args.aa, re_prob=args.reprob))
    p = Pipeline(MEAN, STD, "bilinear", 1.0)
    dataset = timm.data.create_dataset("", root=str(split), is_training=True, input_img_mode="RGB",
                                       transform=decode_only if decode else create_train_transform(cfg, p),
                                       class_map=folder_class_map(split.parent, "train", None))
    loaders = create_loaders(cfg, dataset, dataset, rank=0, world_size=1, seed=0, pin_memory=False)
    loaders.train_sampler.set_epoch(0)
    return loaders.train


def timm_loader(split: Path, args, decode: bool):
    import timm

    dataset = timm.data.create_dataset("", root=str(split), is_training=True, input_img_mode="RGB")
    loader = timm.data.create_loader(
        dataset, input_size=(3, args.image_size, args.image_size), batch_size=args.batch, is_training=True,
        use_prefetcher=False, re_prob=args.reprob, re_mode="pixel", re_count=1, scale=(0.08, 1.0),
        ratio=(0.75, 1.3333333), hflip=0.5, color_jitter=0.4, auto_augment=args.aa, interpolation="bilinear",
        mean=MEAN, std=STD, num_workers=args.workers, persistent_workers=True)
    if decode:
        dataset.transform = decode_only  # set before the first iteration starts the workers
    return loader


MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def one_pass(loader) -> float:
    """Images per second over one full pass (the batches are only counted)."""
    start, n = time.perf_counter(), 0
    for images, _ in loader:
        n += images.shape[0]
    return n / (time.perf_counter() - start)


def compare(name: str, ours, theirs, rounds: int) -> float:
    one_pass(ours), one_pass(theirs)  # warm-up: worker start, page cache
    a, b = [], []
    for r in range(rounds):  # alternate, flipping the order, so machine noise hits both alike
        for which in ((ours, theirs) if r % 2 == 0 else (theirs, ours)):
            (a if which is ours else b).append(one_pass(which))
    ratio = statistics.median(a) / statistics.median(b)
    print(f"{name:<28} framework {statistics.median(a):7.1f} img/s   timm {statistics.median(b):7.1f} img/s   "
          f"ratio {ratio:.3f}   (rounds: {' '.join(f'{x:.0f}' for x in a)} | {' '.join(f'{x:.0f}' for x in b)})",
          flush=True)
    return ratio


def measure_startup(root: Path, files: int) -> None:
    """What a run on a folder of `files` tiny PNGs pays before its first batch: validation (the class scan
    and checks of the front door) and building the datasets (timm's file scan), in a warm process."""
    import numpy as np
    import timm
    from PIL import Image

    from framework.data.loaders import create_datasets
    from framework.recipe.resolve import resolve_recipe

    rng = np.random.default_rng(0)
    for split, count in (("train", files), ("val", files // 10)):
        if (root / split).is_dir():
            continue
        for i in range(count):
            folder = root / split / f"c{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"{i:06d}.png")
    args = ["data.source=folder", f"data.root={root}", "model.name=test_resnet"]
    quickstart = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    resolve_recipe(quickstart, ["model.name=test_resnet"])  # imports and first model build, paid by any run
    start = time.perf_counter()
    recipe = resolve_recipe(quickstart, args)
    validated = time.perf_counter() - start
    start = time.perf_counter()
    train, val = create_datasets(recipe.data, timm.create_model("test_resnet", num_classes=10), 10, 3, 0)
    built = time.perf_counter() - start
    print(f"startup on {len(train) + len(val)} files: validation {validated:.2f} s, datasets {built:.2f} s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--source-size", default="200x180", help="JPEG width x height")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--aa", default="rand-m9-mstd0.5")
    parser.add_argument("--reprob", type=float, default=0.25)
    parser.add_argument("--root", help="where the JPEGs go (default: a temporary folder)")
    parser.add_argument("--startup-files", type=int, default=30000, help="tiny PNGs for the start-up measure (0: skip)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    w, h = map(int, args.source_size.split("x"))
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="bench_data-"))
    write_jpeg_folder(root, args.images, (w, h))
    print(f"{args.images} JPEGs {w}x{h} -> {args.image_size} px, batch {args.batch}, {args.workers} workers, "
          f"{args.aa}, re_prob {args.reprob}, {os.cpu_count()} cores; median of {args.rounds} rounds", flush=True)
    ratios = {}
    for name, split in (("folder", root / "train"), ("tar", root / "train.tar")):
        ratios[name] = compare(f"{name}: full transform", our_loader(split, args, False),
                               timm_loader(split, args, False), args.rounds)
    compare("folder: decode alone", our_loader(root / "train", args, True), timm_loader(root / "train", args, True),
            args.rounds)
    print("ratio framework / timm (full transform): " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    if args.startup_files:
        measure_startup(root / "startup", args.startup_files)
    return 0


if __name__ == "__main__":
    sys.exit(main())
