"""16-bit precision the hardware cannot run fast, said before the first epoch.

A CPU without AVX-512 BF16 or AMX runs bf16 autocast through slow fallbacks (measured: resnet18 20 times
slower than fp32), and fp16 autocast is slow on most CPUs (about 20 times on an AVX-512 BF16 one, where
bf16 keeps pace with fp32): a recipe copied from a GPU box looks hung. So a 16-bit run first times a
forward and backward of its own model on a few images, in fp32 and under its autocast, and says the
ratio when 16-bit is `SLOW_RATIO` times slower or more; `backend.slow_precision: refuse` stops the run
there instead.
The probe runs in eval mode (no BatchNorm statistic moves, no dropout draws), on inputs from its own
generator, and clears the gradients it made: the run that follows is the one it would have been.
"""

from __future__ import annotations

import time

import torch

SLOW_RATIO = 3.0  # "several times slower": below this, 16-bit may still pay for itself in memory


class SlowPrecision(Exception):
    """`backend.slow_precision = 'refuse'` and the probe found 16-bit slow (one line, exit 2)."""


PROBE_IMAGES = 8  # fewer, and per-call overheads hide the arithmetic: bf16 on one image measured 2x, on 8 1x


def _seconds(model, x: torch.Tensor, autocast, passes: int, enough: float = float("inf")) -> float:
    """The fastest of `passes` forward+backward passes (the first also warms up); stops early once a pass
    takes `enough` seconds or more, which settles the verdict without paying for slow passes."""
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        with autocast():
            out = model(x)
        out.float().sum().backward()
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        best = min(best, time.perf_counter() - start)
        if best >= enough:
            break
    return best


def probe_precision(model: torch.nn.Module, precision: str, device: torch.device, image_size: int,
                    in_chans: int, images: int = PROBE_IMAGES) -> tuple[float, float]:
    """(fp32 seconds, 16-bit seconds) for a batch of `images` through `model` on `device`."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    shape = (images, in_chans, image_size, image_size)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    was_training = model.training
    model.eval()
    try:
        fp32 = _seconds(model, x, lambda: torch.autocast(device.type, enabled=False), passes=3)
        half = _seconds(model, x, lambda: torch.autocast(device.type, dtype=dtype), passes=3,
                        enough=3 * SLOW_RATIO * fp32)
    finally:
        model.train(was_training)
        for p in model.parameters():
            p.grad = None
    return fp32, half


def check_precision_speed(model, recipe, precision: str, device: torch.device) -> str | None:
    """The line to print when 16-bit is slow here (None when fast, or fp32); raises SlowPrecision under `refuse`.
    Every process probes its own device; the verdict is rank 0's, so all of them agree."""
    if precision == "fp32":
        return None
    import torch.distributed as dist

    images = min(PROBE_IMAGES, recipe.data.batch_size)
    fp32, half = probe_precision(model, precision, device, recipe.data.image_size, recipe.model.in_chans, images)
    ratio = [half / max(fp32, 1e-9)]
    if dist.is_initialized():
        dist.broadcast_object_list(ratio, src=0)
    if ratio[0] < SLOW_RATIO:
        return None
    what = "CPU" if device.type == "cpu" else torch.cuda.get_device_name(device)
    line = (f"backend.precision = {precision!r} runs {ratio[0]:.1f}x slower than fp32 on this {what} (one forward and "
            f"backward of {recipe.model.name} on {images} images: {half * 1e3:.0f} ms against {fp32 * 1e3:.0f} ms)")
    if recipe.backend.slow_precision == "refuse":
        raise SlowPrecision(f"{line}; backend.slow_precision = 'refuse': use backend.precision = 'fp32', or 'warn' "
                            "to run anyway")
    return f"warning: {line}; backend.precision = 'fp32' would train faster here"
