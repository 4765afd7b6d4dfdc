"""Benchmark: `bnswa train` against timm's own `train.py`, one process, on a folder of real JPEGs.

Both train the same tiny model at a size where the data path weighs (test_resnet at 128 px), with the
same RandAugment policy, random erasing, bilinear resizing, SGD and cosine schedule, batch size and
loader workers, alternating in one run (the order flips every round). Each side's figure is its own
epoch average after the first epoch (timm's `Train:` log line, our `summary.json`), images per second;
the ratio is ours / timm's (goal: >= 1.0). timm's `train.py` is not part of this project: fetch timm's
repository and pass the file.

  python benchmarks/bench_vs_timm.py --timm-train PATH/TO/timm/train.py [--rounds 2] [--epochs 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_data import write_jpeg_folder  # noqa: E402


def timm_rate(args, data: Path, out: Path, env: dict) -> float:
    cmd = [sys.executable, args.timm_train, "--data-dir", str(data), "--train-split", "train", "--val-split", "val",
           "--model", args.model, "--num-classes", "10", "--img-size", str(args.image_size), "-b", str(args.batch),
           "--epochs", str(args.epochs), "--aa", args.aa, "--reprob", str(args.reprob), "-j", str(args.workers),
           "--device", "cpu", "--no-prefetcher", "--train-interpolation", "bilinear", "--smoothing", "0",
           "--opt", "sgd", "--lr", "0.1", "--momentum", "0.9", "--weight-decay", "5e-4", "--sched", "cosine",
           "--warmup-epochs", "0", "--log-interval", "1000000", "--output", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"timm's train.py failed (exit {proc.returncode}):\n{text[-3000:]}")
    last = {}  # epoch -> the epoch's running average rate, from its last Train: line
    for epoch, rate in re.findall(r"Train: (\d+) \[.*?\(\s*[\d.]+s,\s*([\d.]+)/s\)", text):
        last[int(epoch)] = float(rate)
    return statistics.mean(v for e, v in last.items() if e > 0)


def our_rate(args, data: Path, out: Path, env: dict) -> float:
    overrides = [f"model.name={args.model}", "data.source=folder", f"data.root={data}", f"data.image_size={args.image_size}",
                 f"data.batch_size={args.batch}", f"data.workers={args.workers}", f"data.augment.auto_augment={args.aa}",
                 f"data.augment.re_prob={args.reprob}", "data.augment.scale=[0.08,1.0]", "data.augment.hflip=0.5",
                 "averaging.strategy=none", f"schedule.epochs={args.epochs}", "schedule.warmup_epochs=0",
                 "logging.wandb.mode=disabled", "logging.progress=false", f"output.dir={out}", "resume=never"]
    cmd = [sys.executable, "-m", "framework", "train", str(ROOT / "recipes" / "quickstart.yaml"), *overrides,
           "--num-processes", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"bnswa train failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads((out / "summary.json").read_text())["throughput"]["train_images_per_s"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timm-train", required=True, help="timm's train.py (from timm's repository)")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--model", default="test_resnet")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", default="2")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--aa", default="rand-m9-mstd0.5")
    parser.add_argument("--reprob", type=float, default=0.25)
    parser.add_argument("--root", help="where the JPEGs go (default: a temporary folder)")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    work = Path(tempfile.mkdtemp(prefix="bench_vs_timm-"))
    data = write_jpeg_folder(Path(args.root) if args.root else work / "data", args.images, (200, 180))
    env = {**os.environ, "OMP_NUM_THREADS": str(cores), "CI": "true", "PYTHONPATH": str(ROOT)}
    workers = args.workers if args.workers != "auto" else "auto (framework) / " + args.workers
    print(f"{args.images} JPEGs 200x180, {args.model} at {args.image_size} px, batch {args.batch}, {workers} workers, "
          f"{args.aa}, re_prob {args.reprob}, 1 process x {cores} threads, {args.epochs} epochs per run", flush=True)
    ours, theirs = [], []
    for r in range(args.rounds):
        for side in (("timm", "ours") if r % 2 == 0 else ("ours", "timm")):
            out = work / f"{side}-{r}"
            rate = timm_rate(args, data, out, env) if side == "timm" else our_rate(args, data, out, env)
            (ours if side == "ours" else theirs).append(rate)
            print(f"round {r + 1}: {side:<4} {rate:7.1f} images/s", flush=True)
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"bnswa train {a:.1f} images/s, timm train.py {b:.1f} images/s: ratio {a / b:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
