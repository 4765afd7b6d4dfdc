"""The grid that answers the question, and its section of docs/RESULTS.md.

bn.mode (local, sync, reduce) x averaging (SWA: recipes/swa_recompute.yaml, EMA: recipes/ema.yaml)
[x per-process batch] x seeds, 2 processes on CPU (or one per GPU), every run evaluating the
averaged weights under all five BN sources. `--dataset digits` (the bundled digits) or
`fashion_mnist` (Fashion-MNIST, small and large per-process batches, GRIDS below). Finished runs
are skipped, so an interrupted grid continues where it stopped. Each dataset writes its own
section of the page, between `<!-- grid:<dataset> -->` markers; the others are kept.

`--together` runs SWA and EMA as two averagers of one run (`averaging` as a list, named `swa` and
`ema`): half the launches, and `compare` gives each averager its row (an `averaging.name` column).
The run trains as the SWA recipe does, so the EMA averages a trajectory that ends under SWALR's
constant learning rate, not the EMA recipe's own; its section is `<dataset>-together`.

  python studies/run_grid.py [--dataset digits|fashion_mnist] [--together] [--seeds 0 1 2] [--out runs/grid-<dataset>]
                            [--wandb disabled|offline|online] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

AVERAGING = {"swa": "recipes/swa_recompute.yaml", "ema": "recipes/ema.yaml"}
BN_MODES = ("local", "sync", "reduce")


@dataclass(frozen=True)
class Grid:
    title: str  # "Measured on ..."
    overrides: list[str] = field(default_factory=list)  # on top of each averaging recipe
    batches: tuple[int | None, ...] = (None,)  # per-process batch sizes; None: the recipe's
    base_lr: float | None = None  # learning rate at a global batch of 64, scaled linearly with the batch
    swa_lr_ratio: float | None = None  # SWALR's constant learning rate as a fraction of the scaled peak
    ema_decay: float | None = None  # at 64 images per process; 1 - decay scales with the batch (the same span of images)
    figures: str = "results"  # under the page's folder


GRIDS = {
    "digits": Grid("the bundled digits"),
    # test_resnet (0.37 M parameters, 15 BN layers) at the images' own 28 px, on a fixed 24,000-image subset for
    # 5 epochs: few images per process (8), where local batch statistics are noisy, against many (64). No
    # random-resized crop: at this length the net underfits, and without it 30,000 x 5 reached 90.3% live top-1 at
    # batch 64 (86.5% after 3 epochs, 89.4% with the crop and the same schedule). SWALR's constant learning rate is
    # 1/20 of the peak at both batches; EMA's decay is 0.99 at 64 (0.99875 at 8: the same span of images). After each epoch only `recompute` is evaluated (top-1 per epoch); all five
    # BN sources after the last.
    "fashion_mnist": Grid(
        "Fashion-MNIST",
        overrides=["data.source=fashion_mnist", "model.name=test_resnet", "model.in_chans=1", "data.image_size=28",
                   "data.augment.scale=[1.0,1.0]", "data.augment.ratio=[1.0,1.0]", "data.augment.hflip=0.5",
                   "data.train_subset=24000", "schedule.epochs=5", "bn.recompute_batches=200",
                   "eval.bn_sources=[recompute]"],
        batches=(8, 64), base_lr=0.2, swa_lr_ratio=0.05, ema_decay=0.99,
        figures="results/fashion_mnist"),
}


def run_one(recipe: str, overrides: list[str], out: Path, nproc: int) -> tuple[float, bool]:
    """Launch one run unless it already completed. Returns (launch wall seconds, ran now)."""
    summary, seconds_file = out / "summary.json", out / "launch_seconds.txt"
    if summary.is_file() and json.loads(summary.read_text())["status"] == "completed" and seconds_file.is_file():
        return float(seconds_file.read_text()), False
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--config_file", str(ROOT / "accelerate_config.yaml"), "--num_processes", str(nproc),
           str(ROOT / "launch" / "train.py"), str(ROOT / recipe), *overrides, f"output.dir={out}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, "CI": "true"}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    seconds = time.perf_counter() - start
    seconds_file.write_text(f"{seconds:.0f}\n")
    return seconds, True


def hardware() -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none"
    return (f"{cpu}, {os.cpu_count()} cores, GPUs: {gpus}; Python {platform.python_version()}, torch {torch.__version__}")


PAGE_TITLE = "# Which BatchNorm statistics for averaged weights? Measured"


def splice_section(page: Path, name: str, body: str) -> None:
    """Write `body` as the page's section for `name`, keeping every other section."""
    start, end = f"<!-- grid:{name} -->", f"<!-- /grid:{name} -->"
    text = page.read_text() if page.is_file() else PAGE_TITLE + "\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text)


def write_results(table: str, keys: list[str], rows: list[dict], plots: list[Path], seeds: list[int], wall_s: float,
                  nproc: int, page: Path, dataset: str, extra: list[str], together: bool) -> None:
    from framework.reporting.reading import reading

    grid = GRIDS[dataset]
    rel = [p.relative_to(page.parent) for p in plots]
    batches = "" if grid.batches == (None,) else f", {' and '.join(map(str, grid.batches))} images per process"
    averaging = ("SWA and EMA as two averagers of one run (the SWA recipe's training, SWALR included, with "
                 "`recipes/ema.yaml`'s EMA beside it)" if together else
                 "SWA (`recipes/swa_recompute.yaml`) and EMA (`recipes/ema.yaml`)")
    text = "\n".join([
        f"## Measured on {grid.title}" + (", SWA and EMA in one run" if together else ""),
        "",
        f"Generated by `python studies/run_grid.py --dataset {dataset}{' --together' if together else ''}` (see README, "
        "\"Results\"): `bn.mode` local / sync / reduce,",
        f"{averaging}{batches}, seeds {', '.join(map(str, seeds))}, "
        f"{nproc} processes, every run evaluating the averaged weights under all five BN sources.",
        *([f"Overrides on both recipes: `{' '.join([*grid.overrides, *extra])}`."] if grid.overrides or extra else []),
        f"Cells are mean ± sample std over seeds. Grid wall time: {wall_s / 60:.1f} min (sum of the launches, each from start to exit).",
        "",
        f"Hardware: {hardware()}.",
        "",
        "### Reading",
        "",
        *reading(rows),
        "",
        "### Table",
        "",
        "top-1 in %; `live` is the trained model itself, `avg+<source>` the averaged weights with that source's BN",
        "statistics; images/s over all processes; `avg update ms` per averaging update; `recompute s` per pass.",
        "",
        table,
        "",
        "### Plots",
        "",
        *(f"![{p.stem}]({p.as_posix()})" for p in rel),
        "",
    ])
    splice_section(page, section_name(dataset, together), text)


def section_name(dataset: str, together: bool) -> str:
    return f"{dataset}-together" if together else dataset


def averaging_list() -> str:
    """`averaging=[...]`: each recipe's averaging section, named by its strategy, as one run's list."""
    from framework.averaging import AVERAGERS
    from framework.recipe.resolve import resolve_recipe
    from framework.recipe.schema import to_dict

    entries = []
    for strategy, recipe in AVERAGING.items():
        entry = to_dict(resolve_recipe(ROOT / recipe).averaging)
        entries.append({**{k: v for k, v in entry.items() if k not in AVERAGERS or k == strategy}, "name": strategy})
    return "averaging=" + json.dumps(entries)


def cells(dataset: str, seeds: list[int], nproc: int, extra: list[str], together: bool = False):
    """(run folder name, recipe, overrides) for every run of the grid."""
    grid = GRIDS[dataset]
    plans = [("together", AVERAGING["swa"], list(AVERAGING))] if together else [(s, r, [s]) for s, r in AVERAGING.items()]
    listed = [averaging_list()] if together else []
    for prefix, recipe, strategies in plans:
        at = {s: f"averaging.{s}." if together else "averaging." for s in strategies}  # averaging.<name>.<key> in a list
        for mode in BN_MODES:
            for batch in grid.batches:
                lr = None if batch is None else grid.base_lr * batch * nproc / 64
                sized = [] if batch is None else [f"data.batch_size={batch}", f"optimizer.lr={lr:g}"]
                if grid.swa_lr_ratio is not None and "swa" in strategies:
                    sized.append(f"{at['swa']}swa.lr={lr * grid.swa_lr_ratio:g}")
                if grid.ema_decay is not None and "ema" in strategies:
                    sized.append(f"{at['ema']}ema.decay={1 - (1 - grid.ema_decay) * batch / 64:g}")
                for seed in seeds:
                    name = f"{prefix}-{mode}" + ("" if batch is None else f"-b{batch}") + f"-seed{seed}"
                    yield name, recipe, [*grid.overrides, *listed, *sized, f"bn.mode={mode}", f"seed={seed}", *extra]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", choices=sorted(GRIDS))
    parser.add_argument("--together", action="store_true", help="SWA and EMA as two averagers of one run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=None, help="default: runs/grid-<dataset> (runs/grid for digits)")
    parser.add_argument("--wandb", default="disabled", choices=("disabled", "offline", "online"))
    parser.add_argument("--page", type=Path, default=ROOT / "docs" / "RESULTS.md")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="further overrides on every run")
    parser.add_argument("--limit", type=int, default=None, help="run only the first N cells (a smoke test)")
    args = parser.parse_args()
    import torch

    from framework.reporting.compare import compare

    nproc = torch.cuda.device_count() or 2
    section = section_name(args.dataset, args.together)
    out_root = args.out or ROOT / "runs" / ("grid" if section == "digits" else f"grid-{section}")
    extra = [*args.set, f"logging.wandb.mode={args.wandb}"]
    run_dirs, wall = [], 0.0
    for name, recipe, overrides in list(cells(args.dataset, args.seeds, nproc, extra, args.together))[:args.limit]:
        out = out_root / name
        seconds, ran = run_one(recipe, overrides, out, nproc)
        wall += seconds
        status = f"done in {seconds:.0f} s" if ran else f"already complete ({seconds:.0f} s when it ran)"
        print(f"{out.name}: {status}", flush=True)
        run_dirs.append(out)
    figures = args.page.parent / (GRIDS[args.dataset].figures + ("-together" if args.together else ""))
    table, keys, rows, plots = compare(run_dirs, figures)
    write_results(table, keys, rows, plots, args.seeds, wall, nproc, args.page, args.dataset, args.set, args.together)
    print(table)
    print(f"\nwritten: {args.page} (section {section})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
