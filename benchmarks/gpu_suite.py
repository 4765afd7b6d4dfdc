"""The GPU suite: what CPU cannot show, in one table to paste into docs/RESULTS.md (run by tests/run_gpu.sh).

Runs tests/test_gpu.py (SyncBatchNorm over NCCL against BN over the concatenated batch, bf16 and fp16
with overflows and averaging, ZeRO-2/3 and FSDP2 shard-local averaging against DDP in bf16 and fp16,
the pinned offloaded averaged copy), then the step benchmark against the hand-written loop on each
engine (DDP, ZeRO-2, ZeRO-3, FSDP2 in bf16; FSDP2 in fp16; DDP fp16 with Mixup, accumulation and
channels_last) and the averaging benchmark (updates against AveragedModel and
ModelEmaV3, recompute cost). Prints each check's outcome or figure, naming the GPU.

  python benchmarks/gpu_suite.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(cmd: list[str], timeout: int = 1800) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "CI": "true"}, capture_output=True, text=True, timeout=timeout)
    return proc.stdout + proc.stderr


def pytest_rows(xml: Path) -> list[tuple[str, str]]:
    rows = []
    for case in ET.parse(xml).iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag] + (
                    f": {node.get('message', '')[:120]}" if tag != "failure" else "")
        rows.append((case.get("name"), outcome))
    return rows


def grep(text: str, pattern: str) -> str:
    found = re.search(pattern, text)
    return found.group(1) if found else "not found (see the output above)"


def prefetcher_ratio(work: Path) -> str:
    """`data.prefetcher` on and off: images/s of the same run on a JPEG folder (resnet50 at 224 px, RandAugment,
    random erasing), where the CPU path's normalisation and float copies weigh."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_data import write_jpeg_folder

    data = write_jpeg_folder(work / "jpegs", 4000, (320, 280))
    rates = {}
    for on in (True, False):
        out = work / f"run-{on}"
        text = run([str(BIN / "python"), "-m", "framework", "train", "recipes/quickstart.yaml", "model.name=resnet50",
                    "data.source=folder", f"data.root={data}", "data.image_size=224", "data.batch_size=128",
                    "data.augment.auto_augment=rand-m9-mstd0.5-inc1", "data.augment.re_prob=0.25", "schedule.epochs=3",
                    "backend.precision=bf16", "model.channels_last=true", f"data.prefetcher={on}",
                    "logging.wandb.mode=disabled", f"output.dir={out}", "--num-processes", "1"])
        summary = out / "summary.json"
        if not summary.is_file():
            return "did not run: " + text[-300:]
        import json

        rates[on] = json.loads(summary.read_text())["throughput"]["train_images_per_s"]
    return f"{rates[True] / rates[False]:.3f} ({rates[True]:.0f} / {rates[False]:.0f} images/s)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer benchmark rounds")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device here: the GPU suite has nothing to run")
        return 1
    gpu = f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}"
    rounds = ["--rounds", "3" if args.quick else "10"]
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "gpu.xml"
        out = run([str(BIN / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py",
                   f"--junitxml={xml}"], timeout=3600)
        print(out[-3000:])
        rows += pytest_rows(xml) if xml.is_file() else [("tests/test_gpu.py", "did not run")]
    step = [str(BIN / "accelerate"), "launch", "--config_file", "accelerate_config.yaml", "--num_processes", "1",
            "benchmarks/bench_step.py", "recipes/bench_synthetic.yaml", *rounds, "data.image_size=160", "data.batch_size=128"]
    engines = {"DDP": [], "ZeRO-2": ["backend.type=deepspeed", "backend.zero_stage=2"],
               "ZeRO-3": ["backend.type=deepspeed", "backend.zero_stage=3"], "FSDP2": ["backend.type=fsdp"]}
    steps = [(f"step, {name}, bf16", ["backend.precision=bf16", *extra]) for name, extra in engines.items()]
    steps.append(("step, FSDP2, fp16", ["backend.precision=fp16", "backend.type=fsdp"]))
    for label, extra in (*steps,
                         ("step, DDP, fp16 + Mixup/CutMix + accumulate 2 + channels_last",
                          ["backend.precision=fp16", "mixup.mixup_alpha=0.8", "mixup.cutmix_alpha=1.0", "loss.name=soft_ce",
                           "optimizer.accumulate_steps=2", "model.channels_last=true"])):
        out = run([*step, *extra])
        print(out[-1500:])
        rows.append((f"{label}: framework / hand-written (goal >= 0.97)", grep(out, r"hand-written: ([0-9.]+ \(median[^)]*\))")))
    rows.append(("prefetcher on / off, JPEG folder, bnswa train (goal > 1)", prefetcher_ratio(Path(tempfile.mkdtemp()))))
    out = run([str(BIN / "python"), "benchmarks/bench_averaging.py", "--device", "cuda", *rounds])
    print(out[-2000:])
    rows.append(("SWA update: ours / AveragedModel (goal <= 1)", grep(out, r"AveragedModel\s*: ([0-9.]+)")))
    rows.append(("EMA update: ours / timm ModelEmaV3 (goal <= 1)", grep(out, r"ModelEmaV3\s*: ([0-9.]+)")))
    rows.append(("recompute pass / one training epoch (quickstart)", grep(out, r"fraction ([0-9.]+)")))
    print(f"\n### GPU suite on {gpu} (torch {torch.__version__})\n\n| check | result |\n|---|---|")
    for name, result in rows:
        print(f"| {name} | {result} |")
    return 0 if all(not r.startswith(("FAILED", "ERROR", "not found", "did not")) for _, r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
