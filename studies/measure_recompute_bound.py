"""Measure a bounded recompute pass against the full one, on finished runs' averaged weights.

For each run: its exported averaged weights get BN statistics from the whole training set, and from
`--batches` per process as the run's world size would draw them (batches x processes batches of the
run's per-process size, in one process); both are evaluated on the validation set. Differences are
paired (the same weights), with the 95% Student-t rule of framework/reporting/reading.py.

  python studies/measure_recompute_bound.py runs/grid-fashion_mnist/*-b8-* [--batches 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--batches", type=int, default=200, help="per process, as bn.recompute_batches")
    args = parser.parse_args()
    from measure_recompute_inputs import rebuild, top1_after_pass  # studies/ is this script's own folder

    from framework.reporting.reading import diff

    full, bounded, images = [], [], None
    for out in args.runs:
        world = json.loads((out / "summary.json").read_text())["world_size"]
        recipe, model, loaders, device = rebuild(out, ["bn.recompute_inputs=train"])
        n = recipe.model.num_classes
        full.append(top1_after_pass(model, loaders.train, None, loaders, n, device))
        bounded.append(top1_after_pass(model, loaders.train, args.batches * world, loaders, n, device))
        images = (args.batches * world * recipe.data.batch_size, len(loaders.train) * recipe.data.batch_size)
        print(f"{out.name}: full {full[-1]:.2f}, bounded {bounded[-1]:.2f}", flush=True)
    spread = lambda xs: f"{statistics.fmean(xs):.2f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.2f}"  # noqa: E731
    print(f"\n{len(full)} runs; bounded pass: {args.batches} batches per process = {min(images):,} of {images[1]:,} "
          f"training images")
    print(f"averaged top-1, full pass {spread(full)}; bounded {spread(bounded)}; "
          f"bounded - full (paired): {diff([b - f for b, f in zip(bounded, full, strict=True)])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
