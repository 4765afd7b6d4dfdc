"""Fresh BN statistics for the current weights: one pass over training data, identical on every process.

Estimator: every BN layer's running_mean and running_var become the mean and the unbiased
variance of that layer's input over all samples and positions of the pass (the sums are
accumulated in float64 and all-reduced with their counts, so processes get the same values,
weighted by how much each saw). This is the population statistic, not
`torch.optim.swa_utils.update_bn`'s mean of per-batch variances, which misses the spread of
the batch means. During the pass only BN layers are in training mode (dropout and drop-path
stay off); each batch is normalised with its own statistics as in training, global-batch ones
under SyncBatchNorm.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from framework.bn import bn_modules


@torch.no_grad()
def recompute_bn_stats(model: torch.nn.Module, batches, max_batches: int | None = None, device=None,
                       autocast=contextlib.nullcontext, dtype=torch.float32) -> int:
    """Overwrite the BN running statistics of `model` (unwrapped). Returns the batches used."""
    bns = bn_modules(model)
    sums = {m: torch.zeros(2 * m.num_features + 1, dtype=torch.float64, device=m.running_mean.device) for m in bns}

    def accumulate(module, inputs):
        x = inputs[0].detach().double()
        dims = [0, *range(2, x.ndim)]
        acc = sums[module]
        acc[: module.num_features] += x.sum(dims)
        acc[module.num_features: -1] += (x * x).sum(dims)
        acc[-1] += x.numel() / x.shape[1]

    modes = {m: m.training for m in model.modules()}
    steps = [m.num_batches_tracked.clone() for m in bns]  # a training-step count: the pass must not add to it
    hooks = [m.register_forward_pre_hook(accumulate) for m in bns]
    model.eval()
    for m in bns:
        m.train()
    used = 0
    try:
        for images, *_ in batches:
            if max_batches is not None and used >= max_batches:
                break
            with autocast():
                model(images.to(device or images.device, dtype))
            used += 1
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.train(mode)
        for m, n in zip(bns, steps, strict=True):
            m.num_batches_tracked.copy_(n)
    if bns and dist.is_initialized() and dist.get_world_size() > 1:
        flat = torch.cat([sums[m] for m in bns])
        dist.all_reduce(flat)
        sums = dict(zip(bns, flat.split([2 * m.num_features + 1 for m in bns]), strict=True))
    for m in bns:
        c = m.num_features
        s, q, n = sums[m][:c], sums[m][c:-1], sums[m][-1]
        if n < 2:  # the pass never reached this layer (a branch the forward skips): 0/0, keep what it had
            continue
        mean = s / n
        var = (q / n - mean * mean).clamp_min(0) * n / (n - 1)  # float64 keeps the subtraction exact enough
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
    return used
