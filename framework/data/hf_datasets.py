"""`data.dataset: hfds/PATH`: a Hugging Face `datasets` image dataset on local disk, never downloaded.

PATH (relative to `data.root` when that is set) is either a `save_to_disk` folder of a DatasetDict (one
entry per split), or a folder of Parquet files named by split: `<split>.parquet`, `<split>-*.parquet`
or `<split>/*.parquet`. The image column is `image` (a `datasets.Image`), the label column `label` (a
`ClassLabel`, whose names number the classes). Both are Arrow tables on disk with an index, so the
dataset is map-style and keeps every guarantee of an image folder: each process draws its own shard,
exact resume inside an epoch, every validation image counted once, the same recompute pass.

timm's own `hfds/` reader calls `datasets.load_dataset(name)`, which looks on the Hub for a name it
cannot find locally and cannot open a `save_to_disk` folder; this reader opens local files only.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from torch.utils.data import Dataset

from framework.recipe.schema import DataConfig

PREFIX = "hfds/"
IMAGE_KEY, LABEL_KEY = "image", "label"


def is_hfds(name: str | None) -> bool:
    return name is not None and name.lower().startswith(PREFIX)


def local_path(cfg: DataConfig) -> Path:
    path = Path(cfg.dataset[len(PREFIX):])
    return Path(cfg.root) / path if cfg.root and not path.is_absolute() else path


def _parquet_files(folder: Path, split: str) -> list[str]:
    files = [folder / f"{split}.parquet", *sorted(folder.glob(f"{split}-*.parquet")), *sorted((folder / split).glob("*.parquet"))]
    return [str(f) for f in files if f.is_file()]


def open_split(cfg: DataConfig, split: str):
    """The split as a `datasets.Dataset` (memory-mapped Arrow), from local files only."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing here may reach the Hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    folder = local_path(cfg)
    if (folder / "dataset_dict.json").is_file():
        saved = datasets.load_from_disk(str(folder))
        if split not in saved:
            raise FileNotFoundError(f"split {split!r} is not in the saved DatasetDict (splits: {', '.join(saved)})")
        return saved[split]
    if (folder / "state.json").is_file():
        raise FileNotFoundError("a save_to_disk folder of a single Dataset has no splits; save a DatasetDict "
                                "with one entry per split")
    files = _parquet_files(folder, split)
    if not files:
        raise FileNotFoundError(f"no save_to_disk DatasetDict and no Parquet files for split {split!r} "
                                f"({split}.parquet, {split}-*.parquet or {split}/*.parquet)")
    return datasets.Dataset.from_parquet(files)  # Arrow cache in datasets' own cache folder, not the data folder


class HfImageDataset(Dataset):
    """(transform(image), label) by index; images stay encoded in the table until read."""

    def __init__(self, table, transform, mode: str):
        import datasets

        missing = [k for k in (IMAGE_KEY, LABEL_KEY) if k not in table.column_names]
        if missing:
            raise ValueError(f"no column {', '.join(map(repr, missing))} (columns: {', '.join(table.column_names)})")
        self.table = table.cast_column(IMAGE_KEY, datasets.Image(decode=False))
        self.transform, self.mode = transform, mode
        label = table.features[LABEL_KEY]
        self.classes = list(label.names) if hasattr(label, "names") else None

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int):
        from PIL import Image

        item = self.table[index]
        image = item[IMAGE_KEY]
        image = Image.open(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"])
        return self.transform(image.convert(self.mode)), item[LABEL_KEY]


def create_hf_dataset(cfg: DataConfig, split: str, transform, in_chans: int) -> HfImageDataset:
    return HfImageDataset(open_split(cfg, split), transform, "L" if in_chans == 1 else "RGB")


def check_hf_dataset(cfg: DataConfig, num_classes: int, errors: list[str]) -> None:
    """Both splits open from local files, hold an image and a label column, and fit model.num_classes."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        errors.append(f"data.dataset = {cfg.dataset!r}: needs Hugging Face datasets (pip install datasets)")
        return
    if not local_path(cfg).exists():
        errors.append(f"data.dataset = {cfg.dataset!r}: no such local folder ({local_path(cfg)}); Hub datasets are "
                      "never downloaded: save_to_disk or write Parquet files first")
        return
    for split in (cfg.train_split, cfg.val_split):
        try:
            ds = create_hf_dataset(cfg, split, lambda x: x, 3)
        except (FileNotFoundError, ValueError, OSError) as err:
            errors.append(f"data.dataset = {cfg.dataset!r}: {err}")
            return
        if ds.classes is not None and len(ds.classes) > num_classes:
            errors.append(f"model.num_classes = {num_classes}: {cfg.dataset} has {len(ds.classes)} classes")
            return
