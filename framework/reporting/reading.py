"""The reading of a grid (studies/run_grid.py): each answer with its number, its spread over seeds,
and whether it is beyond the noise.

Differences are paired: two BN sources are compared on the same run (same weights), two `bn.mode`s
on the same seed (same initial weights and data order). A mean difference is *beyond the noise*
when its 95% confidence interval (Student's t over the pairs) excludes zero, else *inside the noise*:
with 3 seeds that takes |mean| > 2.48 std.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from framework.bn.sources import BN_SOURCES

WRONG = {"online": "copying the live model's statistics (AveragedModel's default)",
         "averaged": "averaging the statistics with the weights",
         "swa_start": "restoring the statistics from when averaging began",
         "initial": "the statistics before training (what toggling `track_running_stats` leaves)"}


@dataclass(frozen=True)
class Run:
    strategy: str
    batch: int
    mode: str
    seed: int
    metrics: dict  # framework.reporting.compare._metrics: "live top1", "avg+<source> top1", "images/s", ...


@dataclass(frozen=True)
class Diff:
    mean: float
    std: float
    n: int

    @property
    def beyond(self) -> bool:
        from scipy.stats import t  # scikit-learn's dependency

        return self.n > 1 and abs(self.mean) > t.ppf(0.975, self.n - 1) * self.std / math.sqrt(self.n)

    def __str__(self) -> str:
        spread = f" ± {self.std:.2f}" if self.n > 1 else ""
        return f"{self.mean:+.2f}{spread}" + ("" if self.beyond else " (noise)")


def diff(values: list[float]) -> Diff:
    return Diff(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))


def runs_of(rows: list[dict]) -> list[Run]:
    from framework.reporting.compare import _metrics

    return [Run(r.recipe["averaging.strategy"], r.recipe["data.batch_size"], r.recipe["bn.mode"], r.recipe["seed"],
                _metrics(r)) for row in rows for r in row["runs"]]


def _slices(runs: list[Run]) -> list[tuple[str, int]]:
    return sorted({(r.strategy, r.batch) for r in runs}, key=lambda s: (s[0] != "swa", s[1]))


def _name(s: tuple[str, int], batches: int) -> str:
    return s[0].upper() + (f", batch {s[1]}" if batches > 1 else "")


def source_table(runs: list[Run]) -> tuple[list[str], dict]:
    """Each BN source against `recompute` on the same averaged weights, per strategy and batch."""
    slices, batches = _slices(runs), len({r.batch for r in runs})
    sources = [s for s in BN_SOURCES if s != "recompute" and all(r.metrics.get(f"avg+{s} top1") is not None for r in runs)]
    cells = {(src, s): diff([r.metrics[f"avg+{src} top1"] - r.metrics["avg+recompute top1"] for r in runs
                             if (r.strategy, r.batch) == s]) for src in sources for s in slices}
    lines = ["| BN statistics for the averaged weights | " + " | ".join(_name(s, batches) for s in slices) + " |",
             "|---|" + "---|" * len(slices),
             "| `recompute` (top-1, mean ± std) | " + " | ".join(
                 str(diff([r.metrics["avg+recompute top1"] for r in runs if (r.strategy, r.batch) == s])).lstrip("+")
                 .replace(" (noise)", "") for s in slices) + " |"]
    lines += [f"| `{src}` minus `recompute` | " + " | ".join(str(cells[src, s]) for s in slices) + " |" for src in sources]
    return lines, cells


def mode_effect(runs: list[Run], mode: str, metric: str, strategy: str, batch: int) -> Diff | None:
    by_seed = {(r.mode, r.seed): r.metrics[metric] for r in runs if (r.strategy, r.batch) == (strategy, batch)}
    pairs = [by_seed[mode, seed] - by_seed["local", seed] for (m, seed) in by_seed if m == mode and ("local", seed) in by_seed]
    return diff(pairs) if pairs else None


def reading(rows: list[dict]) -> list[str]:
    runs = runs_of(rows)
    slices, batches = _slices(runs), len({r.batch for r in runs})
    table, cells = source_table(runs)
    out = ["Differences are paired (BN sources on the same run, `bn.mode`s on the same seed), in points of top-1,",
           "mean ± std over pairs; \"(noise)\" marks a mean whose 95% interval (Student's t) includes zero.", "",
           "**Which BN statistics to give the averaged weights.**", "", *table, ""]
    for src in [s for s in WRONG if any(k[0] == s for k in cells)]:
        worst = min(cells[src, s].mean for s in slices)
        beyond = [s for s in slices if cells[src, s].beyond]
        verdict = (f"costs up to {-worst:.2f} points, beyond the noise in {len(beyond)} of {len(slices)} settings"
                   if beyond else "is inside the noise everywhere")
        out.append(f"- `{src}`, {WRONG[src]}, {verdict}.")
    better = [(src, s) for (src, s), d in cells.items() if d.beyond and d.mean > 0]
    out.append("- No source beats `recompute` beyond the noise." if not better else
               "- Beats `recompute` beyond the noise: " + ", ".join(f"`{src}` ({_name(s, batches)}: {cells[src, s]})"
                                                                    for src, s in better) + ".")
    strategies = sorted({r.strategy for r in runs})
    if len(strategies) > 1:
        differ = [src for src in WRONG if any(k[0] == src for k in cells)
                  and len({cells[src, s].beyond and cells[src, s].mean < 0 for s in slices}) > 1]
        out.append("- SWA against EMA: " + (
            "the verdicts agree for every source." if not differ else
            "whether it costs accuracy beyond the noise differs for " + ", ".join(f"`{s}`" for s in differ) + " (table above)."))
    modes = sorted({r.mode for r in runs} - {"local"})
    if modes and any(r.mode == "local" for r in runs):
        out += ["", "**What `bn.mode` changes** (against `local`, same seed):", "",
                "| setting | " + " | ".join(f"{m}: averaged top-1 | {m}: live top-1 | {m}: images/s" for m in modes) + " |",
                "|---|" + "---|---|---|" * len(modes)]
        for strategy, batch in slices:
            row = []
            for m in modes:
                acc = mode_effect(runs, m, "avg+recompute top1", strategy, batch)
                live = mode_effect(runs, m, "live top1", strategy, batch)
                ips = [r.metrics["images/s"] for r in runs if (r.strategy, r.batch, r.mode) == (strategy, batch, m)]
                base = [r.metrics["images/s"] for r in runs if (r.strategy, r.batch, r.mode) == (strategy, batch, "local")]
                row += [str(acc or "-"), str(live or "-"), f"{statistics.fmean(ips) / statistics.fmean(base):.2f}x local"]
            out.append(f"| {_name((strategy, batch), batches)} | " + " | ".join(row) + " |")
        out.append("")
        for m in modes:
            for batch in sorted({r.batch for r in runs}):
                effects = [mode_effect(runs, m, "avg+recompute top1", st, batch) for st in strategies]
                pooled = diff([d.mean for d in effects if d])
                beyond = [st for st, d in zip(strategies, effects, strict=True) if d and d.beyond]
                where = f"at {batch} images per process" if batches > 1 else "here"
                speed = statistics.fmean(r.metrics["images/s"] for r in runs if (r.batch, r.mode) == (batch, m)) / \
                    statistics.fmean(r.metrics["images/s"] for r in runs if (r.batch, r.mode) == (batch, "local"))
                out.append(f"- `{m}` {where}: averaged top-1 {pooled.mean:+.2f} points against `local` (mean over "
                           f"{', '.join(strategies)}), " + (f"beyond the noise for {', '.join(beyond)}" if beyond
                                                             else "inside the noise") +
                           f"; training throughput {speed:.2f}x local's.")
    noise = statistics.fmean(statistics.stdev(v) for row in rows for v in [row["values"]["avg+recompute top1"]] if len(v) > 1) \
        if any(len(row["runs"]) > 1 for row in rows) else 0.0
    out += ["", f"- Seed-to-seed spread of the averaged top-1 with recomputed statistics: ±{noise:.2f} points "
                f"(mean std over configurations).",
            f"- An averaging update costs {statistics.fmean(r.metrics['avg update ms'] for r in runs):.2f} ms and a recompute "
            f"pass {statistics.fmean(r.metrics['recompute s'] for r in runs):.2f} s on average."]
    return out
