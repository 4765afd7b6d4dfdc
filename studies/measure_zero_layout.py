"""Could torch.distributed.checkpoint (DCP) reshard ZeRO checkpoints instead of framework/checkpoint/zero_reshard.py?

DCP reshards what a DTensor describes: each process's piece of a tensor is a torch.chunk of it along a
dimension. This prints, per ZeRO stage, whether each parameter's piece in a process's fp32 partition is such
a chunk of the flattened parameter (ZeRO-3 partitions each parameter alone) or a range of a flat group that
can straddle two processes (ZeRO-1/2 cut the concatenated group, padded to the world size).

  accelerate launch --config_file accelerate_config.yaml --num_processes 2 studies/measure_zero_layout.py 2|3
"""

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from framework.recipe.resolve import resolve_recipe  # noqa: E402
from framework.training.builders import create_accelerator, create_optimizer  # noqa: E402
from framework.training.models import create_model  # noqa: E402

stage = int(sys.argv[1])
r = resolve_recipe(os.path.join(ROOT, "recipes", "quickstart.yaml"), ["model.name=test_resnet", "backend.type=deepspeed", f"backend.zero_stage={stage}", "logging.wandb.mode=disabled"], world_size=2)
acc, _ = create_accelerator(r.backend, 32, None)
model, _ = create_model(r.model, 32)
opt = create_optimizer(r.optimizer, model, 64)
engine, opt = acc.prepare(model, opt)
rank, world = acc.process_index, acc.num_processes
module = acc.unwrap_model(engine)
params = [p for p in module.parameters()]
if stage == 3:
    ok = sum(p.ds_tensor.numel() == math.ceil(p.ds_numel / world) for p in params)
    print(rank, f"ZeRO-3: {ok}/{len(params)} parameters' partitions are torch.chunk pieces of the flat parameter")
else:
    zopt = engine.optimizer
    straddle = total_params = 0
    notes = []
    for group, flat in zip(zopt.bit16_groups, zopt.single_partition_of_fp32_groups, strict=True):
        sizes = [p.numel() for p in group]
        part = flat.numel()
        start = 0
        for n in sizes:
            end = start + n
            straddle += start // part != (end - 1) // part
            start = end
        total_params += len(sizes)
        notes.append(f"{sum(sizes)} values padded to {part * world}")
    print(rank, f"ZeRO-{stage}: groups of {', '.join(notes)}; {straddle} of {total_params} parameters straddle a "
          "partition boundary (a piece that is no torch.chunk of the parameter)")
