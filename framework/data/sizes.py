"""The training set's size at validation: a subset or a batch the data cannot fill is refused before launch.

Counted the way training will see the data (timm's readers over the same folders, tar files, torchvision
or Hugging Face files), without decoding an image. Run only once the data's own checks have passed.
"""

from __future__ import annotations

import gzip
from pathlib import Path

from framework.recipe.schema import DataConfig


def _idx_count(path: Path) -> int:
    """An IDX file's item count: the big-endian 32-bit word after the magic number."""
    packed = path.with_name(path.name + ".gz")
    with (gzip.open(packed, "rb") if packed.is_file() else open(path, "rb")) as f:
        return int.from_bytes(f.read(8)[4:], "big")


def count_train_images(cfg: DataConfig) -> int:
    """Images in the training split, before `data.train_subset`."""
    if cfg.source == "synthetic":
        return cfg.synthetic_train_size
    if cfg.source == "fashion_mnist":
        from framework.data.fashion_mnist import DEBIAN_ROOT, FILES

        return _idx_count(Path(cfg.root or DEBIAN_ROOT) / FILES[0])
    if cfg.source == "timm":
        from framework.data.timm_datasets import create_timm_dataset

        return len(create_timm_dataset(cfg, cfg.train_split, lambda x: x, 3))
    from timm.data import create_dataset

    from framework.data.loaders import digits_split, folder_class_map, split_path

    if cfg.source == "digits":  # counted from the split itself: validation writes no files
        from sklearn.datasets import load_digits

        split = digits_split(load_digits().target)
        return len(split[0] if cfg.train_split == "train" else split[1])
    root = Path(cfg.root)
    classes = folder_class_map(root, cfg.train_split, cfg.class_map)
    return len(create_dataset("", root=str(split_path(root, cfg.train_split)), is_training=True, class_map=classes))


def check_data_size(cfg: DataConfig, world_size: int, errors: list[str]) -> None:
    """`data.train_subset` within the set; every process's shard holds at least one batch."""
    total = count_train_images(cfg)
    if cfg.train_subset is not None and cfg.train_subset > total:
        errors.append(f"data.train_subset = {cfg.train_subset}: larger than the training split ({total} images); "
                      f"at most {total}, or null for all of it")
        return
    shard = min(total, cfg.train_subset or total) // world_size
    if cfg.batch_size > shard:
        errors.append(f"data.batch_size = {cfg.batch_size}: larger than each process's share of the training set "
                      f"({shard} images with {world_size} process{'es' if world_size > 1 else ''}); at most {shard}, "
                      "or fewer processes")
