"""Run under torchrun with 2 processes (gloo): writes each rank's SyncBN and recompute results to OUT_DIR.

tests/test_bn.py launches it and compares against single-process references.
"""

from __future__ import annotations

import sys

import timm
import torch
import torch.distributed as dist

from framework.bn import BN_MODES, bn_buffers
from framework.bn.recompute import recompute_bn_stats
from framework.distributed.comm_meter import CommMeter

PER_RANK, BATCHES = 4, 3


def data(seed: int, batch: int, shape=(3, 32, 32)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *shape, generator=g) for _ in range(BATCHES)]


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    result = {}

    # SyncBN: a BN layer and a timm BatchNormAct2d, forward + input gradient of a fixed loss.
    g = torch.Generator().manual_seed(1)
    x_all = torch.randn(PER_RANK * world, 6, 5, 5, generator=g) * 3 + 2
    grad_all = torch.randn(x_all.shape, generator=g)
    for name, layer in (("bn", torch.nn.BatchNorm2d(6)), ("bnact", timm.layers.BatchNormAct2d(6, act_layer="silu"))):
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5, generator=g)
            layer.bias.uniform_(-0.5, 0.5, generator=g)
        BN_MODES["sync"]().convert(layer, cuda=False)
        layer.train()
        x = x_all[mine].clone().requires_grad_(True)
        y = layer(x)
        (y * grad_all[mine]).sum().backward()
        result[f"sync_{name}_out"], result[f"sync_{name}_grad"] = y.detach(), x.grad
        result[f"sync_{name}_running"] = torch.stack([layer.running_mean, layer.running_var])

    # recompute under each mode: same weights everywhere, each rank its slice of every batch.
    for mode in BN_MODES:
        torch.manual_seed(0)
        model = BN_MODES[mode]().convert(timm.create_model("test_efficientnet", num_classes=10), cuda=False)
        batches = [(b[mine], None) for b in data(2, PER_RANK * world)]
        recompute_bn_stats(model, batches)
        result[f"recompute_{mode}"] = bn_buffers(model)
    # the comm meter sees real traffic (so a zero elsewhere is a measurement)
    meter = CommMeter()
    with meter.measure():
        dist.all_reduce(torch.ones(10))
    result["comm_meter"] = torch.tensor([meter.bytes, meter.calls])
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
