"""The grid that answers the question, on the bundled digits, and docs/RESULTS.md from it.

bn.mode (local, sync, reduce) x averaging (SWA: recipes/swa_recompute.yaml, EMA: recipes/ema.yaml)
x seeds, 2 processes on CPU (or one per GPU), every run evaluating the averaged weights under all
five BN sources. Finished runs are skipped, so an interrupted grid continues where it stopped.

  python launch/run_grid.py [--seeds 0 1 2] [--out runs/grid] [--wandb disabled|offline|online]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

AVERAGING = {"swa": "recipes/swa_recompute.yaml", "ema": "recipes/ema.yaml"}
BN_MODES = ("local", "sync", "reduce")


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


def reading(rows: list[dict], keys: list[str]) -> list[str]:
    """Sentences drawn from the figures, so the page says what this run measured."""
    def mean(row, metric):
        values = [v for v in row["values"][metric] if v is not None]
        return statistics.fmean(values) if values else float("nan")

    sources = ["initial", "swa_start", "online", "averaged", "recompute"]
    best = {s: 0 for s in sources}
    for row in rows:
        top = max(mean(row, f"avg+{s} top1") for s in sources)
        for s in sources:
            best[s] += mean(row, f"avg+{s} top1") >= top - 1e-9
    gap = {s: statistics.fmean(mean(r, "avg+recompute top1") - mean(r, f"avg+{s} top1") for r in rows) for s in sources}
    live = statistics.fmean(mean(r, "avg+recompute top1") - mean(r, "live top1") for r in rows)
    spread = statistics.fmean(statistics.stdev(r["values"]["avg+recompute top1"]) if len(r["runs"]) > 1 else 0.0 for r in rows)

    def versus(s, what):
        verdict = "within" if abs(gap[s]) <= spread else "far beyond"
        return f"{gap[s]:+.2f} points against `{s}`, {what}: {verdict} the seed-to-seed spread of ±{spread:.2f}"

    lines = [
        f"- `recompute` gives the best or tied-best averaged top-1 in {best['recompute']} of {len(rows)} configurations "
        f"(`averaged`: {best['averaged']}, `online`: {best['online']}, `swa_start`: {best['swa_start']}, `initial`: {best['initial']}).",
        f"- Fresh statistics (`recompute`) against statistics that moved with training: "
        f"{versus('online', 'copying the live statistics (AveragedModel default)')}; "
        f"{versus('averaged', 'statistics averaged with the weights')}.",
        f"- Against stale statistics: {versus('swa_start', 'a snapshot from when averaging began')} (for EMA, which starts "
        f"at the first step, that snapshot is the initial statistics); "
        f"{versus('initial', 'toggling `track_running_stats` or restoring a pre-training snapshot')} (chance is 10%).",
        "- So stale statistics are the failure that matters. Among current ones the differences are small on this easy "
        "task; `recompute` is the one that is right by construction, at the cost of one forward pass.",
        f"- The averaged model with recomputed statistics ends {live:+.2f} points from the live model.",
    ]
    mode_key = "bn.mode" if "bn.mode" in keys else None
    if mode_key:
        idx = keys.index(mode_key)
        ips = {m: statistics.fmean(mean(r, "images/s") for r in rows if r["key"][idx] == m) for m in BN_MODES}
        acc = {m: statistics.fmean(mean(r, "avg+recompute top1") for r in rows if r["key"][idx] == m) for m in BN_MODES}
        lines.append(f"- SyncBatchNorm trains at {ips['sync']:.0f} images/s against {ips['local']:.0f} for local BN "
                     f"({100 * (ips['sync'] / ips['local'] - 1):+.0f}%; here gloo on CPU, one all-gather per BN layer), for "
                     f"{acc['sync'] - acc['local']:+.2f} points of recomputed top-1; `reduce` gives {acc['reduce'] - acc['local']:+.2f}.")
    upd = statistics.fmean(mean(r, "avg update ms") for r in rows)
    rec = statistics.fmean(mean(r, "recompute s") for r in rows)
    lines.append(f"- An averaging update costs {upd:.2f} ms on average and a recompute pass {rec:.2f} s.")
    return lines


def write_results(table: str, keys: list[str], rows: list[dict], plots: list[Path], seeds: list[int], wall_s: float,
                  nproc: int, page: Path) -> None:
    rel = [p.relative_to(page.parent) for p in plots]
    text = "\n".join([
        "# Which BatchNorm statistics for averaged weights? Measured on the bundled digits",
        "",
        "Generated by `python launch/run_grid.py` (see README, \"Results\"): `bn.mode` local / sync / reduce,",
        f"SWA (`recipes/swa_recompute.yaml`) and EMA (`recipes/ema.yaml`), seeds {', '.join(map(str, seeds))}, "
        f"{nproc} processes, every run evaluating the averaged weights under all five BN sources.",
        f"Cells are mean ± sample std over seeds. Grid wall time: {wall_s / 60:.1f} min (sum of the launches, each from start to exit).",
        "",
        f"Hardware: {hardware()}.",
        "",
        "## Reading",
        "",
        *reading(rows, keys),
        "",
        "## Table",
        "",
        "top-1 in %; `live` is the trained model itself, `avg+<source>` the averaged weights with that source's BN",
        "statistics; images/s over all processes; `avg update ms` per averaging update; `recompute s` per pass.",
        "",
        table,
        "",
        "## Plots",
        "",
        *(f"![{p.stem}]({p.as_posix()})" for p in rel),
        "",
    ])
    page.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "grid")
    parser.add_argument("--wandb", default="disabled", choices=("disabled", "offline", "online"))
    parser.add_argument("--page", type=Path, default=ROOT / "docs" / "RESULTS.md")
    args = parser.parse_args()
    import torch

    from framework.compare import compare

    nproc = torch.cuda.device_count() or 2
    run_dirs, wall = [], 0.0
    for strategy, recipe in AVERAGING.items():
        for mode in BN_MODES:
            for seed in args.seeds:
                out = args.out / f"{strategy}-{mode}-seed{seed}"
                seconds, ran = run_one(recipe, [f"bn.mode={mode}", f"seed={seed}", f"logging.wandb.mode={args.wandb}"], out, nproc)
                wall += seconds
                status = f"done in {seconds:.0f} s" if ran else f"already complete ({seconds:.0f} s when it ran)"
                print(f"{out.name}: {status}", flush=True)
                run_dirs.append(out)
    figures = args.page.parent / "results"
    table, keys, rows, plots = compare(run_dirs, figures)
    write_results(table, keys, rows, plots, args.seeds, wall, nproc, args.page)
    print(table)
    print(f"\nwritten: {args.page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
