"""`data.source: timm`: a `timm.data.create_dataset` name with local files, and which guarantees hold.

The framework's guarantees need a map-style dataset, one with an index: each process draws its own
shard of a permutation (ShardSampler), a resumed epoch skips by samples seen (exact resume inside
an epoch), validation pads by index and counts every image once, and the recompute pass draws the
same kind of batches on every process (bounded by `bn.recompute_batches`).

- `torch/<name>` (cifar10, cifar100, mnist, kmnist, fashion_mnist, qmnist, places365, imagenet,
  inaturalist, image_folder): torchvision's datasets on their files under `data.root`, never
  downloaded. Map-style: every guarantee holds. Images are converted to `model.in_chans` channels.
- An image folder, or class folders in a tar file per split: `data.source: folder` (timm's
  ImageDataset; map-style, every guarantee holds).
- `wds/`, `tfds/`, `hfids/`: iterable (streamed shards, no index), so none of the three can hold;
  refused at validation with that reason.
- `hfds/PATH`: a Hugging Face `datasets` image dataset on local disk (a `save_to_disk` DatasetDict, or
  Parquet files per split), read by framework/data/hf_datasets.py. Map-style: every guarantee holds.
"""

from __future__ import annotations

from framework.recipe.schema import DataConfig

ITERABLE = ("wds", "tfds", "hfids")


class ToMode:
    """PIL images to the model's channels ('L' or 'RGB'); torchvision's datasets give their own mode."""

    def __init__(self, mode: str, transform):
        self.mode, self.transform = mode, transform

    def __call__(self, image):
        return self.transform(image.convert(self.mode) if image.mode != self.mode else image)


def create_timm_dataset(cfg: DataConfig, split: str, transform, in_chans: int):
    from timm.data import create_dataset

    from framework.data.hf_datasets import create_hf_dataset, is_hfds

    if is_hfds(cfg.dataset):
        return create_hf_dataset(cfg, split, transform, in_chans)

    return create_dataset(cfg.dataset, root=cfg.root, split=split, is_training=False, download=False,
                          transform=ToMode("L" if in_chans == 1 else "RGB", transform))


def check_timm_dataset(cfg: DataConfig, num_classes: int, errors: list[str]) -> None:
    name = cfg.dataset
    if name is None:
        errors.append("data.dataset = None: data.source = 'timm' needs a timm dataset name (torch/cifar10, "
                      "torch/fashion_mnist, ...)")
        return
    prefix = name.partition("/")[0].lower() if "/" in name else ""
    if prefix in ITERABLE:
        errors.append(f"data.dataset = {name!r}: an iterable dataset ({prefix}/) has no index, so exact resume inside "
                      "an epoch, counting every validation image once and an identical recompute pass cannot hold; "
                      "use torch/<name>, or data.source = 'folder' (class folders or <split>.tar files)")
        return
    if prefix == "hfds":
        from framework.data.hf_datasets import check_hf_dataset

        check_hf_dataset(cfg, num_classes, errors)
        return
    if prefix != "torch":
        errors.append(f"data.dataset = {name!r}: choices are torch/<name> (torchvision's datasets on local files), "
                      "hfds/<local path> (Hugging Face datasets saved to disk or as Parquet); "
                      "for image folders or tar files use data.source = 'folder'")
        return
    if cfg.root is None:
        errors.append(f"data.root = None: data.dataset = {name!r} reads its files from data.root (never downloaded)")
        return
    try:  # torchvision finds its files or says why (no download): here, before any process starts
        train = create_timm_dataset(cfg, cfg.train_split, lambda x: x, 3)
    except (RuntimeError, AssertionError, FileNotFoundError, ValueError) as err:
        errors.append(f"data.root = {cfg.root!r}: {name} is not there ({type(err).__name__}: {str(err)[:200]})")
        return
    classes = getattr(train, "classes", None)
    if classes is not None and len(classes) > num_classes:
        errors.append(f"model.num_classes = {num_classes}: {name} has {len(classes)} classes")
