"""Fashion-MNIST from local IDX files (Debian's `dataset-fashion-mnist`), read by timm's `torch/fashion_mnist`.

torchvision's FashionMNIST (which timm's `torch/fashion_mnist` wraps) reads the IDX files
un-gzipped under `<root>/FashionMNIST/raw/`. Debian ships them gzipped in one folder, so they are
un-gzipped once into a cache folder, written to a temporary folder and renamed (concurrent
processes and interrupted writes never leave half a cache), as the digits are. No image folder
is written: the four IDX files are 55 MB, 70,000 PNGs would be many small files for no gain.
Train: the 60,000 training images; validation: all 10,000 test images, the same for every run.
"""

from __future__ import annotations

import gzip
import shutil
import tempfile
from pathlib import Path

from torch.utils.data import Dataset

DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CACHE_VERSION = "v1"
MEAN, STD = (0.2860,), (0.3530,)  # over the 60,000 training images


def missing_files(root: str | None) -> list[str]:
    folder = Path(root or DEBIAN_ROOT)
    return [f"{name}.gz" for name in FILES if not (folder / f"{name}.gz").is_file() and not (folder / name).is_file()]


def check_files(root: str | None, errors: list[str]) -> None:
    missing = missing_files(root)
    if missing:
        errors.append(f"data.root = {root!r}: Fashion-MNIST files not found in {root or DEBIAN_ROOT} "
                      f"({', '.join(missing)}); install them with `apt-get install dataset-fashion-mnist` (as root), "
                      "or point data.root at a folder holding the four IDX files")


def ensure_raw_folder(root: str | None, cache_dir: Path) -> Path:
    """`<cache>/fashion-mnist-v1` with `FashionMNIST/raw/<idx files>`, un-gzipped once."""
    target = cache_dir / f"fashion-mnist-{CACHE_VERSION}"
    if all((target / "FashionMNIST" / "raw" / name).is_file() for name in FILES):
        return target
    source = Path(root or DEBIAN_ROOT)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fashion-mnist-", dir=cache_dir))
    raw = tmp / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in FILES:
        packed = source / f"{name}.gz"
        with (gzip.open(packed, "rb") if packed.is_file() else open(source / name, "rb")) as src, open(raw / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class _ToMode:
    """Fashion-MNIST images are greyscale PIL images; a 3-channel model gets them as RGB."""

    def __init__(self, mode: str, transform):
        self.mode, self.transform = mode, transform

    def __call__(self, image):
        return self.transform(image.convert(self.mode))


def create_fashion_mnist(root: str | None, cache_dir: Path, train_tf, eval_tf, in_chans: int) -> tuple[Dataset, Dataset]:
    from timm.data import create_dataset

    folder = str(ensure_raw_folder(root, cache_dir))
    mode = "L" if in_chans == 1 else "RGB"
    train = create_dataset("torch/fashion_mnist", root=folder, split="train", is_training=True,
                           transform=_ToMode(mode, train_tf))
    val = create_dataset("torch/fashion_mnist", root=folder, split="validation", transform=_ToMode(mode, eval_tf))
    return train, val
