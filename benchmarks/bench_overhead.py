"""Benchmark: what weight averaging and its evaluation add to a run's wall time.

The same recipe, launched with averaging off (`averaging={strategy: none}`) and as written, alternating
in one invocation (the order flips every round, so machine noise hits both alike), each launch timed
from start to exit. Prints every round and the ratio of the medians, averaged / plain.

  python benchmarks/bench_overhead.py recipes/quickstart.yaml [--rounds 3] [--nproc 2] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def launch(recipe: str, overrides: list[str], nproc: int, out: Path) -> float:
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--config_file", str(ROOT / "accelerate_config.yaml"), "--num_processes", str(nproc),
           str(ROOT / "launch" / "train.py"), recipe, *overrides, "resume=never", "logging.wandb.mode=disabled",
           f"output.dir={out}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, "CI": "true"}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"launch failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=2)
    args, overrides = parser.parse_known_args()  # key=value overrides, before or after the options
    args.overrides = overrides
    variants = {"plain": ['averaging={"strategy": "none"}'], "averaged": []}  # replaces a list of averagers too
    times: dict[str, list[float]] = {name: [] for name in variants}
    costs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        for r in range(args.rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                seconds = launch(args.recipe, [*args.overrides, *variants[name]], args.nproc, Path(tmp) / f"{name}-{r}")
                times[name].append(seconds)
            print(f"round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.1f} s" for n in variants), flush=True)
            summary = json.loads((Path(tmp) / f"averaged-{r}" / "summary.json").read_text())
            costs.append(breakdown(summary))
    plain, averaged = statistics.median(times["plain"]), statistics.median(times["averaged"])
    print(f"median wall time: plain {plain:.1f} s, averaged {averaged:.1f} s; ratio averaged / plain {averaged / plain:.3f}")
    print("where it goes (the averaged runs' summaries, medians): "
          + "; ".join(f"{k} {statistics.median(c[k] for c in costs):.3g}" for k in costs[0]))
    return 0


def breakdown(summary: dict) -> dict:
    """What scales with training (averaging updates, as a share of the step) and what is paid per
    evaluation of the averaged weights (recompute passes and evaluations, in seconds)."""
    t, a = summary["throughput"], summary["averaging"]
    step_ms = 1000 * t["step_time_s"]
    update_ms = a.get("update_ms", 0.0)
    names = summary.get("averagers") or [""]  # one averager: results not nested by name
    evals = summary["eval"]["averaged"] if summary.get("averagers") else {"": summary["eval"]["averaged"]}
    return {"averagers": len(names), "update ms (all averagers)": update_ms, "step ms": step_ms,
            "update share of a step %": 100 * update_ms / step_ms,
            "recompute passes s (one per averager)": a.get("recompute_s", 0.0),
            "evaluation s after the last epoch (passes included)": sum(r["seconds"] for rs in evals.values() for r in rs.values())}


if __name__ == "__main__":
    sys.exit(main())
