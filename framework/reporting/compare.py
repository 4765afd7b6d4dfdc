"""`python -m framework compare RUN_DIR... [--out DIR] [--wandb MODE]`: runs side by side.

Reads each run's recipe.yaml, summary.json and metrics.jsonl. Columns are the recipe keys whose
values differ between runs, then the results; runs that differ only by seed form one row
(mean ± sample std over seeds). Writes compare.md and two PNG plots, prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from framework.bn.sources import BN_SOURCES, NO_STATS
from framework.reporting.intervals import epoch_records
from framework.reporting.tracking import flatten

NOT_COMPARED = ("name", "seed", "output.", "logging.")  # bookkeeping, or what groups runs


@dataclass
class RunResult:
    path: Path
    recipe: dict  # flattened: "bn.mode" -> "sync"
    summary: dict
    records: list[dict]


def load_run(path: Path) -> RunResult:
    for name in ("recipe.yaml", "summary.json", "metrics.jsonl"):
        if not (path / name).is_file():
            raise SystemExit(f"error: run dir {str(path)!r}: no {name} (not a finished run)")
    records = epoch_records([json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()])
    return RunResult(path, flatten(yaml.safe_load((path / "recipe.yaml").read_text()), sep="."),
                     json.loads((path / "summary.json").read_text()), records)


def split_averagers(run: RunResult) -> list[RunResult]:
    """A run with several averagers as one result per averager (an `averaging.name` column, not a new
    run): its recipe entry, results, costs and per-epoch metrics in the single-averager layout."""
    names = run.summary.get("averagers")
    if not names:
        return [run]
    entries = run.recipe["averaging"]
    base = {k: v for k, v in run.recipe.items() if k != "averaging"}
    out = []
    for name, entry in zip(names, entries, strict=True):
        report = run.summary["averaging"]["averagers"][name]
        summary = {**run.summary, "averaging": report,
                   "eval": {**run.summary["eval"], "averaged": run.summary["eval"]["averaged"][name]},
                   "throughput": {**run.summary["throughput"], "averaging_update_ms": report["update_ms"],
                                  "bn_recompute_s": report["recompute_s"]}}
        mine, others = f"eval/averaged/{name}/", "eval/averaged/"
        records = [{(k.replace(mine, others, 1) if k.startswith(mine) else k): v for k, v in r.items()
                    if k.startswith(mine) or not k.startswith(others)} for r in run.records]
        recipe = {**base, **flatten(entry, sep=".", prefix="averaging."), "averaging.name": name}
        out.append(RunResult(run.path, recipe, summary, records))
    return out


def varying_keys(runs: list[RunResult]) -> list[str]:
    keys = sorted({k for r in runs for k in r.recipe})
    return [k for k in keys if not k.startswith(NOT_COMPARED)
            and len({json.dumps(r.recipe.get(k), sort_keys=True) for r in runs}) > 1]


def _value(r: RunResult, key: str) -> str:
    """A recipe value for the table; options of an averaging strategy the run does not use show as '-'."""
    parts = key.split(".")
    if parts[0] == "averaging" and len(parts) == 3 and parts[1] != r.recipe.get("averaging.strategy"):
        return "-"
    return str(r.recipe.get(key))


def group_runs(runs: list[RunResult], keys: list[str]) -> dict[tuple, list[RunResult]]:
    groups: dict[tuple, list[RunResult]] = {}
    for r in runs:
        groups.setdefault(tuple(_value(r, k) for k in keys), []).append(r)
    return groups


def _metrics(r: RunResult) -> dict[str, float | None]:
    s, t = r.summary, r.summary["throughput"]
    out = {"live top1": s["eval"]["online"]["top1"]}
    for name in (*BN_SOURCES, NO_STATS):  # the averaged weights under each source of BN statistics (none: no BN)
        out[f"avg+{name} top1"] = s["eval"].get("averaged", {}).get(name, {}).get("top1")
    out.update({"images/s": t["train_images_per_s"], "avg update ms": t.get("averaging_update_ms"),
                "recompute s": t.get("bn_recompute_s")})
    return out


def _cell(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"


def summarize(groups: dict[tuple, list[RunResult]]) -> tuple[list[str], list[dict]]:
    rows = []
    for key, runs in groups.items():
        per_run = [_metrics(r) for r in runs]
        rows.append({"key": key, "runs": runs, "values": {m: [p[m] for p in per_run] for m in per_run[0]}})
    names = list(rows[0]["values"]) if rows else []
    # a column no run fills (avg+none without a BN-free model) is left out
    return [m for m in names if any(v is not None for row in rows for v in row["values"][m])], rows


def markdown_table(keys: list[str], metric_names: list[str], rows: list[dict]) -> str:
    header = [*keys, "runs", *metric_names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [*row["key"], str(len(row["runs"])), *(_cell(row["values"][m]) for m in metric_names)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _label(keys: list[str], key: tuple) -> str:
    pairs = dict(zip(keys, key, strict=True))
    if pairs.get("averaging.name", "None") != "None":  # an averager's name stands for its options
        pairs = {k: v for k, v in pairs.items() if not k.startswith("averaging.") or k == "averaging.name"}
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in pairs.items()) or "run"


def plot(keys: list[str], rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    for row in rows:
        label = _label(keys, row["key"])
        for ax, metric in zip(axes, ("eval/online/top1", "eval/averaged/recompute/top1"), strict=True):
            epochs = sorted({r["epoch"] for run in row["runs"] for r in run.records if metric in r})
            if epochs:
                means = [statistics.fmean(r[metric] for run in row["runs"] for r in run.records
                                          if r["epoch"] == e and metric in r) for e in epochs]
                ax.plot(epochs, means, marker="o", label=label)
    for ax, title in zip(axes, ("online (live model)", "averaged, recomputed BN"), strict=True):
        ax.set(title=f"top-1 per epoch: {title}", xlabel="epoch", ylabel="top-1 (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    paths = [out / "top1_per_epoch.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows)), 4))
    means = [statistics.fmean(row["values"]["images/s"]) for row in rows]
    ax.bar(range(len(rows)), means)
    ax.set_xticks(range(len(rows)), [_label(keys, row["key"]) for row in rows], rotation=30, ha="right", fontsize=7)
    ax.set(title="training throughput (all processes)", ylabel="images/s")
    fig.tight_layout()
    paths.append(out / "throughput.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    paths += _plot_sources(plt, keys, rows, out)
    return paths


def _plot_sources(plt, keys: list[str], rows: list[dict], out: Path) -> list[Path]:
    """Final averaged top-1 under each BN source, per configuration: mean over seeds, error bar one std."""
    sources = [s for s in BN_SOURCES if any(v is not None for row in rows for v in row["values"].get(f"avg+{s} top1", []))]
    if not sources:
        return []
    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(rows)), 4.5))
    width = 0.8 / len(sources)
    for i, source in enumerate(sources):
        values = [[v for v in row["values"][f"avg+{source} top1"] if v is not None] for row in rows]
        means = [statistics.fmean(v) if v else 0.0 for v in values]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        ax.bar([x + (i - (len(sources) - 1) / 2) * width for x in range(len(rows))], means, width, yerr=stds,
               capsize=2, label=source)
    ax.set_xticks(range(len(rows)), [_label(keys, row["key"]) for row in rows], rotation=30, ha="right", fontsize=7)
    ax.set(title="averaged weights: final top-1 per BN source (mean ± std over seeds)", ylabel="top-1 (%)")
    ax.legend(fontsize=7, ncol=len(sources))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / "averaged_top1_per_source.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def compare(run_dirs: list[Path], out: Path) -> tuple[str, list[str], list[dict], list[Path]]:
    runs = [one for p in run_dirs for one in split_averagers(load_run(p))]
    keys = varying_keys(runs)
    metric_names, rows = summarize(group_runs(runs, keys))
    table = markdown_table(keys, metric_names, rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(table + "\n")
    return table, keys, rows, plot(keys, rows, out)


def log_to_wandb(table: str, keys: list[str], rows: list[dict], plots: list[Path], mode: str, out: Path) -> None:
    import wandb

    run = wandb.init(project="bnswa", job_type="compare", mode=mode, dir=str(out), config={"compared_keys": keys})
    lines = [line for line in table.splitlines() if not line.startswith("|---")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    run.log({"comparison": wandb.Table(columns=cells[0], data=cells[1:]),
             **{p.stem: wandb.Image(str(p)) for p in plots}})
    run.finish()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m framework compare", description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--wandb", choices=("offline", "online"), default=None, help="also log as a wandb run")
    args = parser.parse_args(argv)
    for p in args.runs:
        if not p.is_dir():
            print(f"error: run dir {str(p)!r}: not found", file=sys.stderr)
            return 2
    table, keys, rows, plots = compare(args.runs, args.out)
    print(table)
    print(f"\nwritten: {args.out / 'compare.md'}, " + ", ".join(str(p) for p in plots))
    if args.wandb:
        log_to_wandb(table, keys, rows, plots, args.wandb, args.out)
    return 0
