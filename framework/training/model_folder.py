"""Exports as timm users share models: a folder that `timm.create_model("local-dir:PATH", pretrained=True)`
loads with no other argument, in the layout of timm's own `save_for_hf` (its `save_config_for_hf` writes
the config; the weights are the run's export, hard-linked).

Each folder holds `config.json` (architecture, num_classes, the model arguments timm recorded, and a
pretrained config with the mean, std, input size, crop and interpolation the run used), `model.safetensors`,
`recipe.yaml` (the resolved recipe) and a `README.md` model card: which weights these are and which BN
statistics they carry, the data, top-1 per BN source, throughput, hardware, and the command that
reproduces the run. The folder is written beside under a temporary name and renamed, like every export.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from framework.data.loaders import Pipeline
from framework.recipe.resolve import recipe_to_dict
from framework.recipe.yaml_io import dump_yaml

BNSWA_KEY = "bnswa"  # our fields in config.json: timm keeps unknown root keys and ignores them when loading


@dataclass
class Weights:
    """What a folder's weights are: `online`, `averaged` (by `averager`) or `best` (of `epoch`)."""
    kind: str
    averager: str | None = None
    strategy: str | None = None
    bn_stats: str | None = None  # the BN-statistics source the weights carry (averaged weights)
    results: dict = field(default_factory=dict)  # top1/top5/loss per BN source ("live" for the online model)
    epoch: int | None = None


class ModelExporter:
    """Main process only: each export as `<stem>.safetensors` (timm's `checkpoint_path`) and `<stem>/` (local-dir)."""

    def __init__(self, recipe, out: Path, pipeline: Pipeline, model: torch.nn.Module):
        self.recipe, self.out, self.pipeline = recipe, out, pipeline
        # timm's config needs the model's pretrained_cfg: a model registered without one (a user's own
        # architecture) gets the safetensors files only, and the main process says so
        self.folders = getattr(model, "pretrained_cfg", None) is not None
        if not self.folders:
            print(f"note: {recipe.model.name} has no timm pretrained_cfg: exports are safetensors files only, "
                  "without model folders", flush=True)

    def save(self, state_dict: dict, stem: str, weights: Weights, summary: dict) -> None:
        from framework.training.export import save_state_dict

        file = self.out / f"{stem}.safetensors"
        save_state_dict(state_dict, file)
        if self.folders:
            write_model_folder(self.recipe, file, state_dict, self.out / stem, self.pipeline, weights, summary)


def hardware(accelerator) -> str:
    n = accelerator.num_processes
    if accelerator.device.type == "cuda":
        return f"{n} x {torch.cuda.get_device_name(accelerator.device)}"
    return f"{n} CPU process(es), {torch.get_num_threads()} thread(s) each ({platform.processor() or platform.machine()})"


def write_model_folder(recipe, weights_file: Path, state_dict: dict, folder: Path, pipeline: Pipeline,
                       weights: Weights, summary: dict) -> Path:
    """Main process only. `weights_file`: the export just written (`<stem>.safetensors`, the plain timm model's
    state dict), which becomes the folder's `model.safetensors` as a hard link (one copy on disk; a copy where
    links are not possible). `config.json` is timm's own `save_config_for_hf`, on the model rebuilt without
    initialising it (meta device, then the exported tensors assigned)."""
    from timm.models._hub import save_config_for_hf

    from framework.training.models import build_plain

    with torch.device("meta"):
        model = build_plain(recipe.model, recipe.data.image_size)
    model.load_state_dict(state_dict, strict=True, assign=True)
    about = {"weights": weights.kind, "averager": weights.averager, "strategy": weights.strategy,
             "bn_stats": weights.bn_stats, "epoch": weights.epoch, "recipe": recipe.name,
             "top1": {source: r["top1"] for source, r in weights.results.items()}}
    size = recipe.data.image_size
    data_config = {"input_size": (recipe.model.in_chans, size, size), "mean": tuple(pipeline.mean),
                   "std": tuple(pipeline.std), "interpolation": pipeline.interpolation, "crop_pct": pipeline.crop_pct,
                   "crop_mode": "center"}
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    save_config_for_hf(model, str(tmp / "config.json"), data_config=data_config,
                       model_config={BNSWA_KEY: about, "pretrained_cfg": {"tag": f"bnswa-{recipe.name}"}})
    try:
        os.link(weights_file, tmp / "model.safetensors")
    except OSError:
        shutil.copyfile(weights_file, tmp / "model.safetensors")
    (tmp / "recipe.yaml").write_text(dump_yaml(recipe_to_dict(recipe)))
    (tmp / "README.md").write_text(model_card(recipe, folder, pipeline, weights, summary))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def _weights_line(w: Weights) -> str:
    if w.kind == "online":
        return "the live (online) weights after the last epoch, with their own BN running statistics"
    which = f"averager `{w.averager}` ({w.strategy})" if w.averager else "the averaged weights"
    if w.kind == "best":
        return f"the best epoch's weights (epoch {w.epoch}), {which if w.strategy else 'online'}" + (
            f", BN statistics from `{w.bn_stats}`" if w.bn_stats else "")
    stats = f"BN statistics from `{w.bn_stats}`" if w.bn_stats else "no BN running statistics to choose"
    return f"{which} after the last epoch; {stats}"


def model_card(recipe, folder: Path, pipeline: Pipeline, w: Weights, summary: dict) -> str:
    d, m, t = recipe.data, recipe.model, summary.get("throughput", {})
    data = d.dataset if d.source == "timm" else d.source
    rows = "\n".join(f"| {source} | {r['top1']:.2f} | {r.get('top5', float('nan')):.2f} | {r.get('loss', float('nan')):.4f} |"
                     for source, r in w.results.items())
    world = summary.get("world_size", 1)
    return f"""---
tags: [image-classification, timm, bnswa]
library_name: timm
---
# {m.name} · {recipe.name} · {w.kind}{f" ({w.averager})" if w.averager else ""}

{_weights_line(w)}.

```python
import timm
model = timm.create_model("local-dir:{folder.resolve()}", pretrained=True)
cfg = timm.data.resolve_data_config({{}}, model=model)  # mean, std, size, crop and interpolation as trained
```

## Data
- source: `{data}`{f" at `{d.root}`" if d.root else ""}; `{d.train_split}` for training, `{d.val_split}` for validation
- {m.num_classes} classes, {m.in_chans} channel(s), {d.image_size} px; mean {list(pipeline.mean)}, std {list(pipeline.std)},
  {pipeline.interpolation}, crop_pct {pipeline.crop_pct}

## Validation
| BN statistics | top-1 | top-5 | loss |
|---|---|---|---|
{rows}

## Training
- {summary.get("epochs", recipe.schedule.epochs)} epochs, backend `{recipe.backend.type}`, precision `{summary.get("precision")}`
- hardware: {summary.get("hardware", "unknown")}
- throughput: {t.get("train_images_per_s") or float("nan"):.1f} images/s in all ({t.get("train_images_per_s_per_process") or float("nan"):.1f} per process)

## Reproduce
`recipe.yaml` beside this file is the resolved recipe:

```bash
bnswa train {folder.resolve()}/recipe.yaml output.dir=runs/{recipe.name}-again --num-processes {world}
```
"""

