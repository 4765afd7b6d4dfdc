"""Benchmark: DDP, DeepSpeed ZeRO-3 and FSDP2 side by side, in one run on one machine.

For each engine it launches `bench_step.py` (the framework's step against a hand-written loop on the
same engine) and, for the sharded ones, `bench_zero_averaging.py` (shard-local averaging against
gather-then-average), then prints one table. Every figure is a ratio measured within its own launch.

  python benchmarks/bench_engines.py recipes/bench_synthetic.yaml [--num-processes 2] [--rounds 4] [--steps 12] [overrides]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINES = {"ddp": ["backend.type=ddp"], "zero3": ["backend.type=deepspeed", "backend.zero_stage=3"],
           "fsdp2": ["backend.type=fsdp"]}


def _launch(script: str, args: list[str], nproc: int) -> str:
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--config_file", str(ROOT / "accelerate_config.yaml"), "--num_processes", str(nproc),
           str(ROOT / "benchmarks" / script), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: {script} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def _find(pattern: str, text: str) -> str:
    found = re.search(pattern, text)
    return found.group(1) if found else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of {', '.join(ENGINES)}")
    args, overrides = parser.parse_known_args()
    rows = []
    for name in args.engines.split(","):
        engine = ENGINES[name]
        step = _launch("bench_step.py", [args.recipe, "--rounds", str(args.rounds), "--steps", str(args.steps), *overrides,
                                         *engine], args.num_processes)
        row = {"engine": name, "images/s": _find(r"framework\s+:\s+([\d.]+)", step),
               "hand-written": _find(r"hand-written\s+:\s+([\d.]+)", step),
               "ratio": _find(r"ratio framework / hand-written: ([\d.]+)", step)}
        if name != "ddp":
            avg = _launch("bench_zero_averaging.py", [args.recipe, "--rounds", "3", "--updates", "5", *overrides, *engine],
                          args.num_processes)
            row.update({"avg state MiB/process": _find(r"ours ([\d.]+) MiB", avg),
                        "avg bytes/update": _find(r"ours ([\d.]+)\)", avg),
                        "avg time ours/gathered": _find(r"ratio time ours / gather-then-average : ([\d.]+)", avg)})
        rows.append(row)
        print(f"{name}: done", flush=True)
    keys = ["engine", "images/s", "hand-written", "ratio", "avg state MiB/process", "avg bytes/update", "avg time ours/gathered"]
    print(" | ".join(keys))
    print(" | ".join("---" for _ in keys))
    for row in rows:
        print(" | ".join(str(row.get(k, "-")) for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
