"""SyncBatchNorm for CPU process groups (gloo), with torch's SyncBatchNorm semantics.

torch.nn.SyncBatchNorm refuses CPU inputs in training mode and DDP refuses to wrap it on
CPU. Here a BN layer's class is swapped for a subclass whose training forward normalises
with statistics over the global batch: one autograd-aware all-gather of each rank's count,
mean and sum of squared deviations, combined exactly. Its backward routes each rank's share of
the gradient back, which gives SyncBatchNorm's input gradients. The running variance is unbiased
over the global batch, as in torch. Eval mode and world size 1 use the parent's forward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from timm.layers import BatchNormAct2d

# torch 2.15 deprecates torch.distributed.nn.functional.all_gather for this one (its own FutureWarning names it);
# the same forward and gradient (the sum of every rank's gradient for this rank's slice), on gloo too
from torch.distributed._functional_collectives import all_gather_single_autograd


def _global_batch_norm(bn, x: torch.Tensor) -> torch.Tensor:
    dims = [0, *range(2, x.ndim)]
    shape = [1, -1] + [1] * (x.ndim - 2)
    xf = x.float()
    c = x.shape[1]
    n_local = x.numel() / c
    mean_local = xf.mean(dims)
    m2_local = ((xf - mean_local.view(shape)) ** 2).sum(dims)
    count = torch.full((1,), n_local, dtype=xf.dtype, device=x.device)
    # Chan et al.'s parallel combination of (count, mean, M2): exact, and needs nothing
    # else to agree across ranks (as torch's SyncBatchNorm, which all-gathers the same stats).
    stats = all_gather_single_autograd(torch.cat([mean_local, m2_local, count])[None], 0, dist.group.WORLD)
    means, m2s, counts = stats[:, :c], stats[:, c:2 * c], stats[:, -1:]
    n = counts.sum()
    mean = (means * counts).sum(0) / n
    var = (m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)) / n
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            bn.running_mean.lerp_(mean.detach(), factor)
            bn.running_var.lerp_(var.detach() * n / (n - 1), factor)
    y = (xf - mean.view(shape)) * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y.to(x.dtype)


class _GlobalBatchStats:
    def forward(self, x):
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        y = _global_batch_norm(self, x)
        if isinstance(self, BatchNormAct2d):  # keep timm's fused drop + activation
            y = self.act(self.drop(y))
        return y


_CLASSES: dict[type, type] = {}


def convert_gloo_sync_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """In place: every BatchNorm (timm's BatchNormAct2d included) gets global-batch statistics."""
    for module in model.modules():
        cls = type(module)
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not issubclass(cls, _GlobalBatchStats):
            if cls not in _CLASSES:
                _CLASSES[cls] = type(f"GlooSync{cls.__name__}", (_GlobalBatchStats, cls), {})
            module.__class__ = _CLASSES[cls]
    return model
